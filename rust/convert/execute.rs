//! Running a plan: quantizing a window of tensors at a time in parallel and writing each result
//! at its final offset in the output.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::blockwise8;
use crate::dtype::{DType, FloatSlice};
use crate::error::{Error, Result};
use crate::quant4;
use crate::safetensors::{Extent, SafetensorsWriter, TensorDtype, TensorSpec};
use crate::tensor_file::TensorFile;

use super::*;

// ---------------------------------------------------------------------------------------------
// Conversion

/// Where a running conversion stands, for progress bars.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// The tensor just finished (or being copied).
    pub tensor: &'a str,
}

/// What a conversion did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub dst: PathBuf,
    pub tensors_quantized: usize,
    pub tensors_kept: usize,
    pub params_quantized: u64,
    pub params_kept: u64,
    /// Bytes of tensor data read / safetensors bytes written (headers included).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes the quantized tensors take in the output (all their bitsandbytes components).
    pub bytes_out_quantized: u64,
    pub shards: usize,
    pub files_copied: Vec<PathBuf>,
    pub files_skipped: Vec<PathBuf>,
    pub seconds: f64,
}

/// The error a cancelled conversion returns (the progress callback returned false).
pub(crate) fn cancelled(dst: &Path) -> Error {
    Error::io(dst, io::Error::new(io::ErrorKind::Interrupted, "conversion interrupted; nothing was written"))
}

/// Converts `src` into `dst` (see the module docs). `progress` is called on the calling thread
/// after each tensor (and each copied piece of a large one); returning false cancels the
/// conversion, which then removes what it wrote and fails with an `Interrupted` I/O error.
pub fn convert(
    src: &Path,
    dst: Option<&Path>,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress<'_>) -> bool,
) -> Result<Summary> {
    let start = Instant::now();
    let plan = plan(src, dst, opts)?;
    execute(&plan, progress, start)
}

/// Runs a plan built by [`plan`].
pub fn execute(plan: &Plan, progress: &mut dyn FnMut(&Progress<'_>) -> bool, start: Instant) -> Result<Summary> {
    execute_with(plan, progress, None, start)
}

/// Adds files to an output directory before it appears: called with the hidden staging directory
/// once every tensor is written. A `config.json` it writes there is completed like a source's
/// (`quantization_config`, `dtype`); an error removes the whole output.
pub type AddFiles<'a> = &'a mut dyn FnMut(&Path) -> Result<()>;

/// [`execute`], with `add_files` run before the output is renamed into place (directories only).
pub fn execute_with(
    plan: &Plan,
    progress: &mut dyn FnMut(&Progress<'_>) -> bool,
    add_files: Option<AddFiles<'_>>,
    start: Instant,
) -> Result<Summary> {
    let opts = &plan.options;
    let pool = match opts.threads {
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| Error::unsupported(format!("cannot start {n} threads: {e}")))?,
        ),
        None => {
            crate::threads::init();
            None
        }
    };
    if plan.dst_exists && !opts.force {
        return Err(Error::Exists { path: plan.dst.clone() });
    }
    let staging = Staging::begin(&plan.dst, !plan.single_file, opts.force)?;
    // Errors name the destination, not the hidden temporary they happened in.
    let shown = |e: Error| match e {
        Error::Io { path, source } => match path.strip_prefix(&staging.tmp) {
            Ok(rel) => Error::Io { path: plan.dst.join(rel), source },
            Err(_) => Error::Io { path, source },
        },
        other => other,
    };
    let mut summary = write_output(plan, pool.as_ref(), progress, add_files, &staging).map_err(shown)?;
    staging.commit(opts.sync)?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

pub(crate) fn write_output(
    plan: &Plan,
    pool: Option<&rayon::ThreadPool>,
    progress: &mut dyn FnMut(&Progress<'_>) -> bool,
    add_files: Option<AddFiles<'_>>,
    staging: &Staging,
) -> Result<Summary> {
    let opts = &plan.options;
    let mut run = Run {
        plan,
        pool,
        progress,
        bytes_done: 0,
        bytes_total: plan.tensors.iter().map(|t| t.bytes_in).sum(),
        tensors_done: 0,
        summary: Summary { dst: plan.dst.clone(), ..Summary::default() },
    };
    let ckpt = &plan.checkpoint;
    let mut weight_map = Map::new();
    let mut total_size = 0u64;
    for (i, file) in ckpt.files.iter().enumerate() {
        let out = if plan.single_file { staging.tmp.clone() } else { staging.tmp.join(plan.output_name(i)) };
        let (names, data_len) = run.shard(i, file, &out)?;
        total_size += data_len;
        for n in names {
            weight_map.insert(n, Value::String(plan.output_name(i)));
        }
    }
    run.summary.shards = ckpt.files.len();
    if !plan.single_file {
        if let Some((_, index)) = &ckpt.source.index {
            let mut index = index.clone();
            let mut meta = index.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default();
            meta.insert("total_size".into(), Value::from(total_size));
            if meta.contains_key("total_parameters") {
                // transformers counts a 4-bit weight as twice its packed bytes and its
                // quantization state not at all.
                let params: u64 = plan
                    .tensors
                    .iter()
                    .map(|t| if t.quantize { 2 * t.numel().div_ceil(2) } else { t.numel() })
                    .sum();
                meta.insert("total_parameters".into(), Value::from(params));
            }
            index.insert("metadata".into(), Value::Object(meta));
            index.insert("weight_map".into(), Value::Object(weight_map));
            write_text(&staging.tmp.join(INDEX_FILE), &(python_json_dumps(&Value::Object(index)) + "\n"))?;
        }
        let mut config = ckpt.config()?;
        if let Some(add) = add_files {
            let before = staged_files(&staging.tmp)?;
            add(&staging.tmp)?;
            let added = staged_files(&staging.tmp)?.into_iter().filter(|f| !before.contains(f));
            run.summary.files_copied.extend(added);
            config = config.or(take_json_object(&staging.tmp.join(CONFIG_FILE))?);
        }
        if let Some(cfg) = config {
            let cfg = output_config(cfg, plan);
            write_text(&staging.tmp.join(CONFIG_FILE), &(python_json_dumps(&Value::Object(cfg)) + "\n"))?;
        }
        let dir = ckpt.source.dir.clone().unwrap_or_default();
        for rel in &plan.copy_files {
            let to = staging.tmp.join(rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let from = dir.join(rel);
            fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            if opts.sync {
                fs::File::open(&to).and_then(|f| f.sync_all()).map_err(|e| Error::io(&to, e))?;
            }
        }
        run.summary.files_copied.extend(plan.copy_files.iter().cloned());
        run.summary.files_skipped = plan.skipped_files.clone();
    }
    Ok(run.summary)
}

/// config.json of the output: the source's, plus `quantization_config` and `dtype`.
pub(crate) fn output_config(mut cfg: Map<String, Value>, plan: &Plan) -> Map<String, Value> {
    if !plan.options.dequantize_only {
        cfg.insert("quantization_config".into(), quantization_config(&plan.options, &plan.skip_modules));
    }
    for (k, v) in &plan.config_extra {
        cfg.insert(k.clone(), v.clone());
    }
    if !cfg.contains_key("dtype") {
        // transformers 5 writes `dtype` (the dtype of the unquantized parameters); keep a legacy
        // `torch_dtype` as it is for older readers.
        let dtype = match cfg.get("torch_dtype").and_then(Value::as_str) {
            Some(d) => Some(d.to_string()),
            None => dominant_float_dtype(plan).map(|d| d.name().to_string()),
        };
        if let Some(d) = dtype {
            cfg.insert("dtype".into(), Value::String(d));
        }
    }
    cfg
}

/// The float dtype holding the most source bytes.
pub(crate) fn dominant_float_dtype(plan: &Plan) -> Option<DType> {
    let mut bytes: HashMap<DType, u64> = HashMap::new();
    for t in &plan.tensors {
        if let Some(d) = t.dtype.as_float() {
            *bytes.entry(d).or_default() += t.bytes_in;
        }
    }
    bytes.into_iter().max_by_key(|&(_, b)| b).map(|(d, _)| d)
}

pub(crate) struct Run<'a, 'p> {
    pub(crate) plan: &'a Plan,
    pub(crate) pool: Option<&'a rayon::ThreadPool>,
    pub(crate) progress: &'p mut dyn FnMut(&Progress<'_>) -> bool,
    pub(crate) bytes_done: u64,
    pub(crate) bytes_total: u64,
    pub(crate) tensors_done: usize,
    pub(crate) summary: Summary,
}

/// The output tensors of one quantized weight: (name, bytes), the JSON state first.
pub(crate) type Parts = Vec<(String, Vec<u8>)>;

impl Run<'_, '_> {
    pub(crate) fn tick(&mut self, bytes: u64, tensor: &str, finished: bool) -> Result<()> {
        self.bytes_done += bytes;
        if finished {
            self.tensors_done += 1;
        }
        let p = Progress {
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            tensors_done: self.tensors_done,
            tensors_total: self.plan.tensors.len(),
            tensor,
        };
        if (self.progress)(&p) {
            Ok(())
        } else {
            Err(cancelled(&self.plan.dst))
        }
    }

    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Converts shard `i` into `out`; returns the output tensor names with their byte sizes.
    pub(crate) fn shard(&mut self, i: usize, file: &TensorFile, out: &Path) -> Result<(Vec<String>, u64)> {
        let opts = &self.plan.options;
        let tensors: Vec<&TensorPlan> = self.plan.tensors.iter().filter(|t| t.shard == i).collect();
        let mut specs = Vec::new();
        for tp in &tensors {
            if tp.quantize {
                specs.extend(quantized_specs(tp, opts));
            } else {
                specs.push(TensorSpec { name: tp.name.clone(), dtype: tp.dtype, extent: Extent::Shape(tp.shape.clone()) });
            }
        }
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let mut metadata: Vec<(String, String)> = file.metadata().to_vec();
        if !metadata.iter().any(|(k, _)| k == "format") {
            metadata.insert(0, ("format".into(), "pt".into()));
        }
        let mut w = SafetensorsWriter::create(out, metadata, specs)?;
        let budget = tensors.iter().filter(|t| t.quantize).map(|t| t.float_bytes()).max().unwrap_or(0).max(MIN_WINDOW_BYTES);
        let mut window: Vec<&TensorPlan> = Vec::new();
        let mut window_bytes = 0u64;
        let mut pending: Parts = Vec::new();
        let mut pending_copies: Vec<&TensorPlan> = Vec::new();
        for tp in &tensors {
            if tp.quantize {
                if !window.is_empty() && window_bytes + tp.float_bytes() > budget {
                    self.window(file, &window, &mut w, &mut pending)?;
                    window.clear();
                    window_bytes = 0;
                }
                window.push(tp);
                window_bytes += tp.float_bytes();
            } else if w.is_placed(&tp.name) {
                self.copy(file, tp, &mut w)?;
            } else {
                pending_copies.push(tp);
            }
        }
        if !window.is_empty() {
            self.window(file, &window, &mut w, &mut pending)?;
        }
        for tp in pending_copies {
            self.copy(file, tp, &mut w)?;
        }
        if let Some((name, _)) = pending.first() {
            return Err(Error::shape(format!("{}: tensor {name:?} could not be placed", out.display())));
        }
        let data_len = w.data_len().unwrap_or(0) as u64;
        self.summary.bytes_out += w.finish(opts.sync)?;
        Ok((names, data_len))
    }

    /// Quantizes a window of tensors in parallel and writes the results.
    pub(crate) fn window(&mut self, file: &TensorFile, window: &[&TensorPlan], w: &mut SafetensorsWriter, pending: &mut Parts) -> Result<()> {
        let opts = &self.plan.options;
        // Let the kernel read the next window while this one is computed.
        if let (Some(last), Some(first)) = (window.last(), window.first()) {
            if let (Some(first), Some(last)) = (file.get(&first.name), file.get(&last.name)) {
                file.prefetch_after(first, last);
            }
        }
        let results: Vec<Result<Parts>> =
            self.install(|| {
                window
                    .par_iter()
                    .map(|tp| match self.plan.precomputed.get(&tp.name) {
                        Some(w) => precomputed_parts(file, tp, w, opts),
                        None => quantize_tensor(file, tp, opts),
                    })
                    .collect()
            });
        for (tp, r) in window.iter().zip(results) {
            let parts = r?;
            let (json_name, json) = &parts[0];
            w.set_len(json_name, json.len())?;
            let bytes: u64 = parts.iter().map(|(_, b)| b.len() as u64).sum();
            for (name, data) in parts {
                if w.is_placed(&name) {
                    w.write(&name, &data)?;
                } else {
                    pending.push((name, data));
                }
            }
            self.summary.tensors_quantized += 1;
            self.summary.params_quantized += tp.numel();
            self.summary.bytes_in += tp.bytes_in;
            self.summary.bytes_out_quantized += bytes;
            self.tick(tp.bytes_in, &tp.name, true)?;
        }
        let mut still = Vec::new();
        for (name, data) in pending.drain(..) {
            if w.is_placed(&name) {
                w.write(&name, &data)?;
            } else {
                still.push((name, data));
            }
        }
        *pending = still;
        for tp in window {
            if let Some(t) = file.get(&tp.name) {
                file.release(t);
            }
        }
        Ok(())
    }

    /// Copies a kept tensor in pieces, releasing the source pages as it goes.
    pub(crate) fn copy(&mut self, file: &TensorFile, tp: &TensorPlan, w: &mut SafetensorsWriter) -> Result<()> {
        let t = file.get(&tp.name).expect("planned from this file");
        let len = t.nbytes();
        if len == 0 {
            self.tick(0, &tp.name, true)?;
        }
        let mut at = 0;
        while at < len {
            let n = COPY_CHUNK.min(len - at);
            w.write_at(&tp.name, at, &file.bytes(t, at, n)?)?;
            file.release_range(t, at, n);
            // Progress counts source bytes (a GGUF tensor's blocks, not the floats written).
            let read = |at: usize| tp.bytes_in * at as u64 / len as u64;
            self.tick(read(at + n) - read(at), &tp.name, at + n == len)?;
            at += n;
        }
        self.summary.tensors_kept += 1;
        self.summary.params_kept += tp.numel();
        self.summary.bytes_in += tp.bytes_in;
        Ok(())
    }
}

pub(crate) fn quantized_names(name: &str, opts: &ConvertOptions) -> Vec<String> {
    let mut v = vec![
        format!("{name}.{QUANT_STATE_PREFIX}{}", opts.quant_type.name()),
        name.to_string(),
        format!("{name}.absmax"),
        format!("{name}.quant_map"),
    ];
    if opts.double_quant {
        v.push(format!("{name}.nested_absmax"));
        v.push(format!("{name}.nested_quant_map"));
    }
    v
}

pub(crate) fn quantized_specs(tp: &TensorPlan, opts: &ConvertOptions) -> Vec<TensorSpec> {
    let n = tp.numel() as usize;
    let blocks = quant4::num_blocks(n, opts.blocksize);
    let dtype = tp.dtype.as_float().expect("quantizable");
    let names = quantized_names(&tp.name, opts);
    let mut specs = vec![
        TensorSpec {
            name: names[0].clone(),
            dtype: TensorDtype::U8,
            extent: Extent::Deferred { max_len: json_max_len(&tp.quantized_shape(), dtype, opts) },
        },
        TensorSpec { name: names[1].clone(), dtype: TensorDtype::U8, extent: Extent::Shape(vec![quant4::packed_len(n), 1]) },
        TensorSpec {
            name: names[2].clone(),
            dtype: if opts.double_quant { TensorDtype::U8 } else { TensorDtype::F32 },
            extent: Extent::Shape(vec![blocks]),
        },
        TensorSpec { name: names[3].clone(), dtype: TensorDtype::F32, extent: Extent::Shape(vec![16]) },
    ];
    if opts.double_quant {
        specs.push(TensorSpec {
            name: names[4].clone(),
            dtype: TensorDtype::F32,
            extent: Extent::Shape(vec![blockwise8::nested_blocks(blocks)]),
        });
        specs.push(TensorSpec { name: names[5].clone(), dtype: TensorDtype::F32, extent: Extent::Shape(vec![256]) });
    }
    specs
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Elements of a float tensor, viewed in place when aligned, else copied (or decoded).
pub(crate) enum Floats<'a> {
    View(FloatSlice<'a>),
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl<'a> Floats<'a> {
    pub(crate) fn new(bytes: &'a [u8], dtype: DType) -> Floats<'a> {
        if let Ok(v) = FloatSlice::from_bytes(bytes, dtype) {
            return Floats::View(v);
        }
        // Unaligned (a header of odd length written by another tool): copy.
        match dtype {
            DType::F32 => Floats::F32(f32_from_le(bytes)),
            DType::F16 => Floats::F16(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect()),
            DType::BF16 => Floats::BF16(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect()),
        }
    }

    pub(crate) fn slice(&self) -> FloatSlice<'_> {
        match self {
            Floats::View(v) => *v,
            Floats::F32(v) => FloatSlice::F32(v),
            Floats::F16(v) => FloatSlice::F16(v),
            Floats::BF16(v) => FloatSlice::BF16(v),
        }
    }
}

/// The transpose of a row-major [rows, cols] tensor, in tiles that stay in cache.
pub(crate) fn transpose(src: FloatSlice<'_>, rows: usize, cols: usize) -> Floats<'static> {
    fn t<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
        const TILE: usize = 32;
        let mut out = vec![T::default(); v.len()];
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in c0..(c0 + TILE).min(cols) {
                        out[c * rows + r] = v[r * cols + c];
                    }
                }
            }
        }
        out
    }
    match src {
        FloatSlice::F32(v) => Floats::F32(t(v, rows, cols)),
        FloatSlice::F16(v) => Floats::F16(t(v, rows, cols)),
        FloatSlice::BF16(v) => Floats::BF16(t(v, rows, cols)),
    }
}

/// Quantizes one tensor into its bitsandbytes components.
pub(crate) fn quantize_tensor(file: &TensorFile, tp: &TensorPlan, opts: &ConvertOptions) -> Result<Parts> {
    let t = file.get(&tp.name).expect("planned from this file");
    let dtype = t.dtype.as_float().expect("quantizable");
    let mut input = file.floats(t, dtype)?;
    if tp.transposed {
        input = transpose(input.slice(), t.shape[0], t.shape[1]);
    }
    let shape = tp.quantized_shape();
    let n = t.numel();
    let blocks = quant4::num_blocks(n, opts.blocksize);
    let mut packed = vec![0u8; quant4::packed_len(n)];
    let mut absmax = vec![0f32; blocks];
    quant4::quantize_4bit(input.slice(), opts.quant_type, opts.blocksize, opts.allow_nonfinite, &mut packed, &mut absmax)
        .map_err(|e| match e {
            Error::NonFinite { index, value, .. } => Error::NonFinite {
                what: format!("{}: tensor {:?} (shape {:?}{})", file.path().display(), t.name, t.shape,
                              if tp.transposed { ", read transposed" } else { "" }),
                index,
                value,
            },
            other => other,
        })?;
    drop(input);
    let names = quantized_names(&t.name, opts);
    // bitsandbytes stores FP4 code 0b1000 as +0.0 (the core's table has -0.0; same decode).
    let code: Vec<f32> = opts.quant_type.code().iter().map(|&c| c + 0.0).collect();
    let code = f32_bytes(&code);
    let mut parts = Vec::with_capacity(6);
    if opts.double_quant {
        let mut q = vec![0u8; blocks];
        let mut nested = vec![0f32; blockwise8::nested_blocks(blocks)];
        let offset = blockwise8::double_quantize(&absmax, &mut q, &mut nested).map_err(|e| e.in_tensor(&t.name))?;
        let json = quant_state_json(opts.quant_type, opts.blocksize, dtype, &shape, Some(offset));
        parts.push((names[0].clone(), json.into_bytes()));
        parts.push((names[1].clone(), packed));
        parts.push((names[2].clone(), q));
        parts.push((names[3].clone(), code));
        parts.push((names[4].clone(), f32_bytes(&nested)));
        parts.push((names[5].clone(), f32_bytes(&blockwise8::signed_dynamic_map())));
    } else {
        let json = quant_state_json(opts.quant_type, opts.blocksize, dtype, &shape, None);
        parts.push((names[0].clone(), json.into_bytes()));
        parts.push((names[1].clone(), packed));
        parts.push((names[2].clone(), f32_bytes(&absmax)));
        parts.push((names[3].clone(), code));
    }
    Ok(parts)
}

/// A 4-bit weight computed elsewhere (by calibration): packed codes and block scales in
/// bitsandbytes' layout, written instead of quantizing the source tensor to nearest.
#[derive(Clone, Debug)]
pub struct PrecomputedWeight {
    pub packed: Vec<u8>,
    /// The `absmax` tensor's bytes: float32 (little-endian) per block, or one 8-bit code per
    /// block with double quantization.
    pub absmax: Vec<u8>,
    /// With double quantization: float32 per 256 blocks, and the offset.
    pub nested_absmax: Vec<f32>,
    pub offset: Option<f32>,
}

/// The output tensors of a precomputed weight (as [`quantize_tensor`] makes them).
pub(crate) fn precomputed_parts(file: &TensorFile, tp: &TensorPlan, w: &PrecomputedWeight, opts: &ConvertOptions) -> Result<Parts> {
    let n = tp.numel() as usize;
    let blocks = quant4::num_blocks(n, opts.blocksize);
    let (absmax_len, nested_len) =
        if opts.double_quant { (blocks, blockwise8::nested_blocks(blocks)) } else { (4 * blocks, 0) };
    if w.packed.len() != quant4::packed_len(n)
        || w.absmax.len() != absmax_len
        || w.nested_absmax.len() != nested_len
        || w.offset.is_some() != opts.double_quant
    {
        return Err(Error::shape(format!(
            "the precomputed 4-bit weight of {:?} (shape {:?}) does not fit {}, blocksize {}, double quant {}: \
             {} packed bytes, {} absmax bytes, {} nested scales",
            tp.name, tp.shape, opts.quant_type.name(), opts.blocksize, opts.double_quant,
            w.packed.len(), w.absmax.len(), w.nested_absmax.len()
        )));
    }
    let t = file.get(&tp.name).expect("planned from this file");
    let dtype = t.dtype.as_float().expect("quantizable");
    let names = quantized_names(&tp.name, opts);
    let code: Vec<f32> = opts.quant_type.code().iter().map(|&c| c + 0.0).collect();
    let json = quant_state_json(opts.quant_type, opts.blocksize, dtype, &tp.quantized_shape(), w.offset);
    let mut parts = vec![
        (names[0].clone(), json.into_bytes()),
        (names[1].clone(), w.packed.clone()),
        (names[2].clone(), w.absmax.clone()),
        (names[3].clone(), f32_bytes(&code)),
    ];
    if opts.double_quant {
        parts.push((names[4].clone(), f32_bytes(&w.nested_absmax)));
        parts.push((names[5].clone(), f32_bytes(&blockwise8::signed_dynamic_map())));
    }
    Ok(parts)
}
