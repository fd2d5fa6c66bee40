//! Inspecting a checkpoint: per-tensor records, a 4-bit weight grouped with its quantization state.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};

use super::*;

// ---------------------------------------------------------------------------------------------
// Inspection

/// bitsandbytes' quantization state of one weight, as stored in a checkpoint.
#[derive(Clone, Debug)]
pub struct StoredQuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub nested_offset: Option<f32>,
}

impl StoredQuantState {
    /// Parses the JSON state tensor `json_name` of a checkpoint.
    pub(crate) fn read(path: &Path, json_name: &str, bytes: &[u8]) -> Result<StoredQuantState> {
        let bad = |m: String| Error::format(path, format!("tensor {json_name:?}: {m}"));
        let text = std::str::from_utf8(bytes).map_err(|_| bad("quantization state is not UTF-8".into()))?;
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("quantization state is not valid JSON: {e}")))?;
        let get_str = |k: &str| v.get(k).and_then(Value::as_str).ok_or_else(|| bad(format!("quantization state has no string {k:?}")));
        let quant_type = QuantType::parse(get_str("quant_type")?).map_err(|e| bad(e.to_string()))?;
        let dtype = DType::parse(get_str("dtype")?).map_err(|e| bad(e.to_string()))?;
        let blocksize = v.get("blocksize").and_then(Value::as_u64).ok_or_else(|| bad("no integer \"blocksize\"".into()))? as usize;
        quant4::check_blocksize(blocksize).map_err(|e| bad(e.to_string()))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("no integer list \"shape\"".into()))?;
        let nested_offset = v.get("nested_offset").and_then(Value::as_f64).map(|x| x as f32);
        Ok(StoredQuantState { quant_type, blocksize, dtype, shape, nested_offset })
    }
}

/// One logical tensor of a checkpoint: a kept tensor, or a 4-bit weight with all its components.
#[derive(Clone, Debug)]
pub struct InspectRow {
    pub name: String,
    pub shard: String,
    /// Logical shape (the original shape of a 4-bit weight).
    pub shape: Vec<usize>,
    /// Stored dtype (`U8` for a 4-bit weight).
    pub stored_dtype: String,
    /// Logical dtype (the original dtype of a 4-bit weight).
    pub dtype: String,
    pub quant: Option<StoredQuantState>,
    pub numel: u64,
    /// Bytes of the tensor and all its quantization components.
    pub bytes: u64,
}

pub(crate) fn component_names(base: &str, qt: &str) -> [String; 6] {
    [
        base.to_string(),
        format!("{base}.absmax"),
        format!("{base}.quant_map"),
        format!("{base}.nested_absmax"),
        format!("{base}.nested_quant_map"),
        format!("{base}.{QUANT_STATE_PREFIX}{qt}"),
    ]
}

/// Per-tensor sizes of a checkpoint (file or directory), 4-bit weights grouped with their state.
pub fn inspect(path: &Path) -> Result<Vec<InspectRow>> {
    let ckpt = Checkpoint::open(path)?;
    inspect_checkpoint(&ckpt)
}

pub(crate) fn inspect_checkpoint(ckpt: &Checkpoint) -> Result<Vec<InspectRow>> {
    let mut rows = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    for (fi, t) in ckpt.tensors() {
        let Some((base, qt)) = t.name.rsplit_once(&format!(".{QUANT_STATE_PREFIX}")) else { continue };
        let file = &ckpt.files[fi];
        let state = StoredQuantState::read(file.path(), &t.name, &file.bytes(t, 0, t.nbytes())?)?;
        let (packed_file, packed) = ckpt.tensor(base).ok_or_else(|| {
            Error::format(file.path(), format!("quantization state {:?} has no packed weight {base:?}", t.name))
        })?;
        let mut bytes = 0u64;
        for c in component_names(base, qt) {
            if let Some((_, ti)) = ckpt.tensor(&c) {
                bytes += ti.nbytes() as u64;
                used.insert(c);
            }
        }
        let numel = state.shape.iter().map(|&d| d as u64).product();
        rows.push(InspectRow {
            name: base.to_string(),
            shard: file_name(packed_file.path()),
            shape: state.shape.clone(),
            stored_dtype: packed.dtype.name().to_string(),
            dtype: state.dtype.name().to_string(),
            quant: Some(state),
            numel,
            bytes,
        });
    }
    for (fi, t) in ckpt.tensors() {
        if used.contains(&t.name) {
            continue;
        }
        rows.push(InspectRow {
            name: t.name.clone(),
            shard: ckpt.source.shard_name(fi),
            shape: t.shape.clone(),
            stored_dtype: t.dtype.name().to_string(),
            dtype: t.dtype.torch_name().to_string(),
            quant: None,
            numel: t.numel() as u64,
            bytes: t.nbytes() as u64,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}
