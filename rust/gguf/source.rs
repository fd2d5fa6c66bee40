//! A GGUF model seen as the float tensors transformers' GGUF loader makes of it: transformers
//! names and shapes, q/k rows un-permuted, decoded to float32 and rounded to the requested dtype.
//! The conversion pipeline reads it like a safetensors file whose tensors are decoded on demand.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};

use super::names::{self, NameMap};
use super::{decode, GgmlType, GgufFile, GgufTensor};
use crate::dtype::{DType, FloatSliceMut};
use crate::error::{Error, Result};
use crate::safetensors::{TensorDtype, TensorInfo};

/// A GGUF model opened for conversion.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    map: NameMap,
    dtype: DType,
    /// The mapped tensors in data order, as a safetensors file of `dtype` would list them
    /// (`begin`/`end` are offsets in that imagined file's data section).
    tensors: Vec<TensorInfo>,
    /// Per entry of `tensors`: index into `file.tensors()` and the un-permutation groups.
    origin: Vec<(usize, Option<usize>)>,
    index: HashMap<String, usize>,
    /// GGUF tensors transformers does not load (not written to the output).
    dropped: Vec<String>,
}

impl GgufSource {
    /// Opens `path` (the whole header validated), maps its tensors to transformers names and checks
    /// that every mapped tensor can be decoded. Reads no tensor data.
    pub fn open(path: &Path, dtype: DType) -> Result<GgufSource> {
        let file = GgufFile::open(path)?;
        let map = NameMap::new(&file)?;
        let mut order: Vec<usize> = (0..file.tensors().len()).collect();
        order.sort_by_key(|&i| file.tensors()[i].offset);
        let (mut tensors, mut origin, mut index, mut dropped) = (Vec::new(), Vec::new(), HashMap::new(), Vec::new());
        let mut end = 0usize;
        for i in order {
            let t = &file.tensors()[i];
            let Some(name) = map.hf_name(&t.name) else {
                dropped.push(t.name.clone());
                continue;
            };
            if !t.ggml_type.decodable {
                return Err(Error::unsupported(format!(
                    "{}: tensor {:?} is stored as {} (ggml type {}), which qlora-rs cannot decode; supported: {}",
                    path.display(),
                    t.name,
                    t.ggml_type.name,
                    t.ggml_type.id,
                    GgmlType::decodable_names()
                )));
            }
            let groups = map.unpermute_groups(&t.name);
            if let Some(g) = groups {
                if t.rows() % (2 * g) != 0 {
                    return Err(Error::format(
                        path,
                        format!("tensor {:?} has {} rows, not a multiple of 2 x {g} heads; cannot undo its rotary permutation", t.name, t.rows()),
                    ));
                }
            }
            let shape = t.shape();
            let nbytes = t.numel() as usize * dtype.size();
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::format(path, format!("two tensors map to {name:?}")));
            }
            tensors.push(TensorInfo { name, dtype: TensorDtype::from_float(dtype), shape, begin: end, end: end + nbytes });
            origin.push((i, groups));
            end += nbytes;
        }
        Ok(GgufSource { file, map, dtype, tensors, origin, index, dropped })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn architecture(&self) -> &str {
        &self.map.architecture
    }

    /// The element type tensors decode to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformers tensors, in the order their data lies in the file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// GGUF tensors that transformers does not load.
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    /// The GGUF tensor a transformers tensor of this source comes from.
    pub fn stored(&self, t: &TensorInfo) -> &GgufTensor {
        &self.file.tensors()[self.origin[self.position(t)].0]
    }

    fn position(&self, t: &TensorInfo) -> usize {
        *self.index.get(&t.name).expect("a tensor of this source")
    }

    /// Decodes elements `first..first + out.len()` (row-major, transformers layout) of `t`; whole
    /// rows are decoded, in parallel.
    pub fn decode(&self, t: &TensorInfo, first: usize, out: FloatSliceMut<'_>) -> Result<()> {
        let (fi, groups) = self.origin[self.position(t)];
        let g = &self.file.tensors()[fi];
        let (row_len, rows) = (g.row_len(), g.rows());
        let n = out.len();
        if out.dtype() != self.dtype || first + n > rows * row_len {
            return Err(Error::shape(format!("tensor {:?}: cannot decode {n} elements from {first} as {:?}", t.name, out.dtype())));
        }
        if n == 0 {
            return Ok(());
        }
        let (r0, r1) = (first / row_len, (first + n).div_ceil(row_len));
        let data = self.file.data(g);
        let source_row = move |r: usize| match groups {
            Some(groups) => names::unpermuted_source_row(r, rows, groups),
            None => r,
        };
        let aligned = first.is_multiple_of(row_len) && n.is_multiple_of(row_len);
        match out {
            FloatSliceMut::F32(o) if aligned => decode::decode_rows(g.ggml_type, data, row_len, r0, &source_row, o),
            FloatSliceMut::F16(o) if aligned => decode::decode_rows(g.ggml_type, data, row_len, r0, &source_row, o),
            FloatSliceMut::BF16(o) if aligned => decode::decode_rows(g.ggml_type, data, row_len, r0, &source_row, o),
            // A range that cuts rows: decode the rows it touches, then copy the part asked for.
            FloatSliceMut::F32(o) => partial(g.ggml_type, data, row_len, r0, r1, first, &source_row, o),
            FloatSliceMut::F16(o) => partial(g.ggml_type, data, row_len, r0, r1, first, &source_row, o),
            FloatSliceMut::BF16(o) => partial(g.ggml_type, data, row_len, r0, r1, first, &source_row, o),
        }
        Ok(())
    }

    /// Bytes `at..at + len` of `t` as the little-endian `dtype` tensor it decodes to.
    pub fn decode_bytes(&self, t: &TensorInfo, at: usize, len: usize) -> Result<Vec<u8>> {
        let size = self.dtype.size();
        if !at.is_multiple_of(size) || !len.is_multiple_of(size) {
            return Err(Error::shape(format!("tensor {:?}: byte range {at}+{len} cuts elements", t.name)));
        }
        let (first, n) = (at / size, len / size);
        Ok(match self.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                self.decode(t, first, FloatSliceMut::F32(&mut v))?;
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::F16 => {
                let mut v = vec![f16::ZERO; n];
                self.decode(t, first, FloatSliceMut::F16(&mut v))?;
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                self.decode(t, first, FloatSliceMut::BF16(&mut v))?;
                bytemuck::cast_slice(&v).to_vec()
            }
        })
    }

    /// Bytes `t` takes in the GGUF file.
    pub fn stored_bytes(&self, t: &TensorInfo) -> usize {
        self.stored(t).nbytes as usize
    }

    pub fn prefetch(&self, t: &TensorInfo) {
        self.file.prefetch(self.stored(t));
    }

    pub fn release(&self, t: &TensorInfo) {
        self.file.release(self.stored(t));
    }
}

#[allow(clippy::too_many_arguments)]
fn partial<T: crate::dtype::Element + Default>(
    ty: GgmlType,
    data: &[u8],
    row_len: usize,
    r0: usize,
    r1: usize,
    first: usize,
    source_row: &(dyn Fn(usize) -> usize + Sync),
    out: &mut [T],
) {
    let mut rows = vec![T::default(); (r1 - r0) * row_len];
    decode::decode_rows(ty, data, row_len, r0, source_row, &mut rows);
    let skip = first - r0 * row_len;
    out.copy_from_slice(&rows[skip..skip + out.len()]);
}

/// One tensor of a GGUF file, for `qlora-rs inspect`.
#[derive(Clone, Debug)]
pub struct GgufInspectRow {
    pub name: String,
    /// The transformers name, or None when transformers does not load the tensor.
    pub hf_name: Option<String>,
    /// Torch order.
    pub shape: Vec<usize>,
    pub ggml_type: &'static str,
    pub numel: u64,
    pub bytes: u64,
    /// Where its data starts in the file.
    pub offset: u64,
    pub decodable: bool,
}

/// The tensors of a GGUF file, in header order; names map to transformers' only for a supported
/// architecture.
pub fn inspect(file: &GgufFile) -> Vec<GgufInspectRow> {
    let map = NameMap::new(file).ok();
    file
        .tensors()
        .iter()
        .map(|t| GgufInspectRow {
            name: t.name.clone(),
            hf_name: map.as_ref().and_then(|m| m.hf_name(&t.name)),
            shape: t.shape(),
            ggml_type: t.ggml_type.name,
            numel: t.numel(),
            bytes: t.nbytes,
            offset: file.data_start + t.offset,
            decodable: t.ggml_type.decodable,
        })
        .collect()
}
