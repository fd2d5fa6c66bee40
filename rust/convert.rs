//! Checkpoint conversion: a float safetensors checkpoint (one file, or a model directory with
//! `model.safetensors` or a sharded `model.safetensors.index.json`) to a 4-bit checkpoint in
//! bitsandbytes' layout, which transformers + bitsandbytes load unchanged; and the inspection of
//! such checkpoints (sizes, and fidelity against the source). A GGUF model is another kind of source
//! ([`crate::gguf::GgufSource`], read through [`TensorFile`]): its tensors are decoded on demand to
//! the float tensors transformers loads from it, then follow the same pipeline.
//!
//! The conversion streams: inputs are memory-mapped, linear weights are quantized a window of
//! tensors at a time (rayon across and within tensors), results go straight to their final offset
//! in the output file, and the source pages of a finished window are dropped from the resident
//! set. Peak memory is therefore about one window (at least the largest tensor) plus its 4-bit
//! output, whatever the size of the model.
//!
//! The output appears atomically: everything is written into a hidden sibling of the
//! destination (`.<name>.tmp-<pid>`), flushed, and renamed into place at the end. Any error or a
//! cancellation from the progress callback removes the temporary; a killed process leaves only
//! that hidden temporary, which the next conversion to the same destination removes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::blockwise8::{self, NESTED_BLOCKSIZE};
use crate::dtype::{DType, Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};
use crate::safetensors::{Extent, SafetensorsFile, SafetensorsWriter, TensorDtype, TensorInfo, TensorSpec};
use crate::tensor_file::TensorFile;

/// File names of a transformers model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";

/// Key suffix of bitsandbytes' JSON quantization state: `<weight>.quant_state.bitsandbytes__nf4`.
pub const QUANT_STATE_PREFIX: &str = "quant_state.bitsandbytes__";

/// Smallest window of tensors quantized together (bytes of input).
const MIN_WINDOW_BYTES: u64 = 64 << 20;

/// Kept tensors are copied in pieces of this size so their pages can be released as they go.
const COPY_CHUNK: usize = 16 << 20;

/// Elements compared per task by [`compare`] (a multiple of every block size, and even).
const COMPARE_CHUNK: usize = 1 << 20;

/// Files of a model directory that hold weights in other formats: not copied to the output.
const OTHER_WEIGHT_EXTENSIONS: [&str; 10] = ["bin", "pt", "pth", "ckpt", "h5", "msgpack", "onnx", "gguf", "ot", "tflite"];

/// Model types whose linear layers are GPT-2 `Conv1D` modules (weights stored [in, out]).
const CONV1D_MODEL_TYPES: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// The `Conv1D` modules of those models (GPT-2's attention and MLP projections).
const CONV1D_MODULES: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

/// Whether a checkpoint's config names a model type whose linear layers are `Conv1D`.
fn conv1d_model(config: Option<&serde_json::Map<String, Value>>) -> bool {
    config.and_then(|c| c.get("model_type")).and_then(Value::as_str).is_some_and(|mt| CONV1D_MODEL_TYPES.contains(&mt))
}

/// Whether tensor `name` of a `Conv1D` model is the [in, out] weight of a `Conv1D` module.
fn is_conv1d_weight(name: &str) -> bool {
    name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()).is_some_and(|m| CONV1D_MODULES.contains(&m))
}

/// Whether a rank-2 source tensor is stored [in, out] (a `Conv1D` weight of a `Conv1D` model), so
/// that its 4-bit form, [out, in], is its transpose.
fn stored_transposed(conv1d_model: bool, name: &str, shape: &[usize]) -> bool {
    conv1d_model && shape.len() == 2 && is_conv1d_weight(name)
}

/// Options of a conversion; the defaults are the QLoRA paper's (NF4, block size 64, double
/// quantization, bfloat16 compute).
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// Written to `quantization_config.bnb_4bit_compute_dtype`; does not change the stored data.
    pub compute_dtype: DType,
    /// Glob patterns on full tensor names. When given, exactly the rank-2 float tensors matching
    /// one of them are quantized (instead of the default selection of linear weights).
    pub include: Vec<String>,
    /// Glob patterns on full tensor names: matching tensors are kept as they are.
    pub exclude: Vec<String>,
    /// Threads for this conversion (default: the global pool, `QLORA_RS_NUM_THREADS` or all cores).
    pub threads: Option<usize>,
    /// Replace an existing destination.
    pub force: bool,
    /// Quantize weights holding NaN/inf (NaN encodes as 0, inf saturates) instead of failing.
    pub allow_nonfinite: bool,
    /// fsync the output before renaming it into place.
    pub sync: bool,
    /// For a GGUF source: the float type its tensors decode to (default bfloat16).
    pub dtype: Option<DType>,
    /// For a GGUF source: write the decoded float model, without quantizing anything.
    pub dequantize_only: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: DType::BF16,
            include: Vec::new(),
            exclude: Vec::new(),
            threads: None,
            force: false,
            allow_nonfinite: false,
            sync: true,
            dtype: None,
            dequantize_only: false,
        }
    }
}

impl ConvertOptions {
    pub fn validate(&self) -> Result<()> {
        if self.quant_type == QuantType::Int4 {
            return Err(Error::unsupported(
                "quant_type \"int4\" has no bitsandbytes checkpoint format: expected \"nf4\" or \"fp4\"",
            ));
        }
        quant4::check_blocksize(self.blocksize)?;
        if self.threads == Some(0) {
            return Err(Error::unsupported("threads must be at least 1"));
        }
        if self.dequantize_only && !(self.include.is_empty() && self.exclude.is_empty()) {
            return Err(Error::unsupported("--dequantize-only quantizes nothing, so --include/--exclude do not apply"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Sources and checkpoints

/// Where the tensors of a checkpoint live.
#[derive(Clone, Debug)]
pub struct Source {
    /// The path as given.
    pub path: PathBuf,
    /// The model directory, or None for a bare `.safetensors` file.
    pub dir: Option<PathBuf>,
    /// The safetensors files, in index order.
    pub shards: Vec<PathBuf>,
    /// The sharded index (path and parsed JSON), if any.
    pub index: Option<(PathBuf, Map<String, Value>)>,
    /// `config.json` of the model directory (or next to a bare file), if present.
    pub config: Option<PathBuf>,
}

impl Source {
    /// Resolves a `.safetensors` file or a model directory.
    pub fn resolve(src: &Path) -> Result<Source> {
        let meta = fs::metadata(src).map_err(|e| Error::io(src, e))?;
        if !meta.is_dir() {
            let config = src.parent().map(|p| p.join(CONFIG_FILE)).filter(|p| p.is_file());
            return Ok(Source { path: src.into(), dir: None, shards: vec![src.into()], index: None, config });
        }
        let config = Some(src.join(CONFIG_FILE)).filter(|p| p.is_file());
        let single = src.join(SINGLE_FILE);
        if single.is_file() {
            return Ok(Source { path: src.into(), dir: Some(src.into()), shards: vec![single], index: None, config });
        }
        let index_path = src.join(INDEX_FILE);
        if !index_path.is_file() {
            let gguf = fs::read_dir(src).into_iter().flatten().flatten().map(|e| e.path()).find(|p| crate::gguf::is_gguf(p));
            let hint = gguf.map(|p| format!(" (to convert the GGUF file here, pass {} itself)", p.display())).unwrap_or_default();
            return Err(Error::format(
                src,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory; expected a model directory, a .safetensors or a .gguf file{hint}"),
            ));
        }
        let text = fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index_path, format!("not valid JSON: {e}")))?;
        let Value::Object(index) = index else {
            return Err(Error::format(&index_path, "expected a JSON object with a \"weight_map\""));
        };
        let Some(Value::Object(weight_map)) = index.get("weight_map") else {
            return Err(Error::format(&index_path, "no \"weight_map\" object mapping tensor names to shard files"));
        };
        let mut shards = Vec::new();
        let mut seen = HashSet::new();
        for (name, file) in weight_map {
            let Some(file) = file.as_str() else {
                return Err(Error::format(&index_path, format!("weight_map[{name:?}] is {file}, expected a file name")));
            };
            if file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == ".." {
                return Err(Error::format(
                    &index_path,
                    format!("weight_map[{name:?}] names {file:?}; expected a file name in the same directory"),
                ));
            }
            if seen.insert(file.to_string()) {
                let path = src.join(file);
                if !path.is_file() {
                    return Err(Error::format(
                        &index_path,
                        format!("shard {file:?} named by the weight_map (for tensor {name:?}) is missing from {}", src.display()),
                    ));
                }
                shards.push(path);
            }
        }
        if shards.is_empty() {
            return Err(Error::format(&index_path, "the weight_map is empty: no tensors to convert"));
        }
        Ok(Source { path: src.into(), dir: Some(src.into()), shards, index: Some((index_path, index)), config })
    }

    fn shard_name(&self, i: usize) -> String {
        file_name(&self.shards[i])
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// An opened checkpoint: every shard mapped and validated, names unique across shards.
#[derive(Debug)]
pub struct Checkpoint {
    pub source: Source,
    pub files: Vec<TensorFile>,
    names: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Opens a safetensors checkpoint, or a GGUF model decoding to bfloat16.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        Self::open_with(path, DType::BF16)
    }

    /// Opens a safetensors checkpoint, or a GGUF model whose tensors decode to `gguf_dtype`.
    pub fn open_with(path: &Path, gguf_dtype: DType) -> Result<Checkpoint> {
        let mut source = Source::resolve(path)?;
        let files = if source.dir.is_none() && crate::gguf::is_gguf(path) {
            // A GGUF carries its own config; a config.json that happens to lie beside it is not its.
            source.config = None;
            vec![TensorFile::Gguf(crate::gguf::GgufSource::open(path, gguf_dtype)?)]
        } else {
            source.shards.iter().map(|p| SafetensorsFile::open(p).map(TensorFile::Safetensors)).collect::<Result<Vec<_>>>()?
        };
        let mut names = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                if let Some((other, _)) = names.insert(t.name.clone(), (fi, ti)) {
                    return Err(Error::format(
                        f.path(),
                        format!("tensor {:?} is also in {}; tensor names must be unique", t.name, files[other].path().display()),
                    ));
                }
            }
        }
        if let Some((index_path, index)) = &source.index {
            if let Some(Value::Object(wm)) = index.get("weight_map") {
                for (name, file) in wm {
                    let file = file.as_str().unwrap_or_default();
                    let found = names.get(name).map(|&(fi, _)| source.shard_name(fi));
                    if found.as_deref() != Some(file) {
                        return Err(Error::format(
                            index_path,
                            format!("weight_map puts tensor {name:?} in {file:?}, but that shard has no such tensor"),
                        ));
                    }
                }
            }
        }
        Ok(Checkpoint { source, files, names })
    }

    /// A tensor by name: its file and header entry.
    pub fn tensor(&self, name: &str) -> Option<(&TensorFile, &TensorInfo)> {
        self.names.get(name).map(|&(fi, ti)| (&self.files[fi], &self.files[fi].tensors()[ti]))
    }

    /// The GGUF model this checkpoint is, if it is one.
    pub fn gguf(&self) -> Option<&crate::gguf::GgufSource> {
        self.files.first().and_then(TensorFile::as_gguf)
    }

    /// All tensors, shard by shard in data order, with their shard index.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.files.iter().enumerate().flat_map(|(i, f)| f.tensors().iter().map(move |t| (i, t)))
    }

    fn config(&self) -> Result<Option<Map<String, Value>>> {
        let Some(path) = &self.source.config else { return Ok(None) };
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(Error::format(path, "expected a JSON object")),
            Err(e) => Err(Error::format(path, format!("not valid JSON: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Selection

/// Matches a glob pattern against a whole name: `*` any run of characters (dots included),
/// `?` one character, `[abc]`, `[a-z]`, `[!abc]` one character of (not of) a set.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&p, pi, s[si]) {
                        if matched {
                            pi = next;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == '[' {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; returns (matched, index after
/// the class), or None if the class is not closed (then `[` is a literal).
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = i < p.len() && (p[i] == '!' || p[i] == '^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() && (p[i] != ']' || first) {
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            matched |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    (i < p.len()).then_some((matched != negate, i + 1))
}

/// Why the default selection keeps a rank-2 float `.weight` (None: it is a linear weight and is
/// quantized). Mirrors what transformers + bitsandbytes convert: `nn.Linear` layers except the
/// output head; embeddings and norms are other module types.
fn default_keep_reason(name: &str) -> Option<&'static str> {
    let module = name.strip_suffix(".weight")?;
    for part in module.split('.') {
        let p = part.to_ascii_lowercase();
        if p == "lm_head" {
            return Some("output head");
        }
        if p.contains("embed") || p == "wte" || p == "wpe" || p == "shared" || p.contains("relative_attention_bias") {
            return Some("embedding");
        }
        if p.contains("norm") || p == "ln_f" || p.starts_with("ln_") {
            return Some("norm");
        }
    }
    None
}

fn quantizable(t: &TensorInfo) -> std::result::Result<(), String> {
    if t.shape.len() != 2 {
        return Err(format!("rank {}", t.shape.len()));
    }
    if t.dtype.as_float().is_none() {
        return Err(format!("dtype {}", t.dtype.name()));
    }
    if t.numel() == 0 {
        return Err("empty".into());
    }
    Ok(())
}

/// (quantize?, reason) for one tensor.
fn decide(t: &TensorInfo, include: &[String], exclude: &[String]) -> (bool, String) {
    if let Err(why) = quantizable(t) {
        return (false, why);
    }
    if let Some(p) = exclude.iter().find(|p| glob_match(p, &t.name)) {
        return (false, format!("--exclude {p}"));
    }
    if !include.is_empty() {
        return match include.iter().find(|p| glob_match(p, &t.name)) {
            Some(p) => (true, format!("--include {p}")),
            None => (false, "not in --include".into()),
        };
    }
    if !t.name.ends_with(".weight") {
        return (false, "not a .weight".into());
    }
    match default_keep_reason(&t.name) {
        Some(r) => (false, r.into()),
        None => (true, "linear weight".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Plan

/// What happens to one source tensor.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    /// Index into `Plan::source.shards`.
    pub shard: usize,
    pub dtype: TensorDtype,
    /// How the source stores it: its safetensors dtype, or its ggml type in a GGUF file.
    pub stored: &'static str,
    pub shape: Vec<usize>,
    pub quantize: bool,
    /// A GPT-2 `Conv1D` weight, stored [in, out]: quantized as its transpose [out, in], which is
    /// how transformers' bitsandbytes layers hold it.
    pub transposed: bool,
    /// Why it is quantized or kept ("linear weight", "embedding", "--exclude *.mlp.*", ...).
    pub reason: String,
    pub bytes_in: u64,
    /// Bytes of all output tensors it becomes (the JSON state estimated before conversion).
    pub bytes_out: u64,
}

impl TensorPlan {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes of the float tensor quantization reads (more than `bytes_in` for a GGUF source).
    fn float_bytes(&self) -> u64 {
        self.numel() * (self.dtype.bits() / 8) as u64
    }

    /// The shape the quantization state records: [out, in].
    pub fn quantized_shape(&self) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if self.transposed {
            shape.reverse();
        }
        shape
    }
}

/// Everything a conversion will do, computed from the headers alone (`--dry-run` prints it).
#[derive(Debug)]
pub struct Plan {
    pub checkpoint: Checkpoint,
    pub dst: PathBuf,
    /// The output is one `.safetensors` file rather than a directory.
    pub single_file: bool,
    pub dst_exists: bool,
    /// Source tensors, shard by shard, in data order.
    pub tensors: Vec<TensorPlan>,
    /// Other files of the model directory to copy (relative paths).
    pub copy_files: Vec<PathBuf>,
    /// Files left out because they hold weights in another format (relative paths).
    pub skipped_files: Vec<PathBuf>,
    /// `llm_int8_skip_modules` for config.json: None (null) for the default selection.
    pub skip_modules: Option<Vec<String>>,
    pub options: ConvertOptions,
    /// Weights computed elsewhere (calibration, `crate::calibrate`), written instead of
    /// quantizing the source tensor of that name; empty for a plain conversion.
    pub precomputed: HashMap<String, PrecomputedWeight>,
    /// Keys merged into the output config.json (the calibration record).
    pub config_extra: Map<String, Value>,
}

impl Plan {
    /// File name of output shard `i` in the output directory: the source's name, or
    /// `model.safetensors` for a bare source file (so that transformers finds it).
    pub fn output_name(&self, i: usize) -> String {
        match &self.checkpoint.source.dir {
            Some(_) => self.checkpoint.source.shard_name(i),
            None => SINGLE_FILE.to_string(),
        }
    }
}

/// The default destination: a sibling directory `<name>-<quant type>` of a model directory,
/// or `<stem>-<quant type>` next to a `.safetensors` file.
pub fn default_destination(src: &Path, quant_type: QuantType) -> PathBuf {
    sibling_destination(src, quant_type.name())
}

/// `<name>-<suffix>` next to a model directory, `<stem>-<suffix>` next to a file.
fn sibling_destination(src: &Path, suffix: &str) -> PathBuf {
    let src = if src.as_os_str().is_empty() { Path::new(".") } else { src };
    let abs = if src.is_absolute() {
        src.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(src)).unwrap_or_else(|_| src.to_path_buf())
    };
    let abs = normalize(&abs);
    let stem = if abs.is_dir() {
        file_name(&abs)
    } else {
        abs.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let parent = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    parent.join(format!("{stem}-{suffix}"))
}

/// Lexically removes `.` and `..` components.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn absolute(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    // Resolve symlinks of the existing part so that aliases of the same directory compare equal.
    let norm = normalize(&abs);
    if let Ok(c) = norm.canonicalize() {
        return c;
    }
    match (norm.parent().and_then(|d| d.canonicalize().ok()), norm.file_name()) {
        (Some(d), Some(n)) => d.join(n),
        _ => norm,
    }
}

fn json_max_len(shape: &[usize], dtype: DType, opts: &ConvertOptions) -> usize {
    // The float repr of the offset is at most 24 characters ("-1.2345678901234567e-308").
    quant_state_json(opts.quant_type, opts.blocksize, dtype, shape, opts.double_quant.then_some(0.0)).len() + 24
}

/// The usual JSON length (offsets print with about 19 characters).
fn json_len_estimate(shape: &[usize], dtype: DType, opts: &ConvertOptions) -> usize {
    let offset = if opts.double_quant { Some(0.0) } else { None };
    quant_state_json(opts.quant_type, opts.blocksize, dtype, shape, offset).len() + if opts.double_quant { 16 } else { 0 }
}

/// Output bytes of one quantized tensor of `numel` elements (plus its JSON state).
fn quantized_bytes(numel: usize, json_len: usize, opts: &ConvertOptions) -> u64 {
    let blocks = quant4::num_blocks(numel, opts.blocksize);
    let mut b = quant4::packed_len(numel) + 16 * 4 + json_len;
    if opts.double_quant {
        b += blocks + blockwise8::nested_blocks(blocks) * 4 + 256 * 4;
    } else {
        b += blocks * 4;
    }
    b as u64
}

/// Builds the plan of converting `src` into `dst` (default: [`default_destination`]).
/// Validates every input header, the options and the destination path; writes nothing.
pub fn plan(src: &Path, dst: Option<&Path>, opts: &ConvertOptions) -> Result<Plan> {
    opts.validate()?;
    let checkpoint = Checkpoint::open_with(src, opts.dtype.unwrap_or(DType::BF16))?;
    if checkpoint.gguf().is_none() && (opts.dtype.is_some() || opts.dequantize_only) {
        return Err(Error::unsupported(
            "--dtype and --dequantize-only apply to GGUF sources; a safetensors checkpoint keeps its dtype",
        ));
    }
    let config = checkpoint.config()?;
    if let Some(cfg) = &config {
        let path = checkpoint.source.config.as_ref().expect("config present");
        if cfg.get("quantization_config").is_some_and(|q| !q.is_null()) {
            return Err(Error::format(path, "has a quantization_config: the model is already quantized"));
        }
    }
    let conv1d = conv1d_model(config.as_ref());
    for (_, t) in checkpoint.tensors() {
        if t.name.contains(&format!(".{QUANT_STATE_PREFIX}")) {
            return Err(Error::format(
                &checkpoint.source.path,
                format!("tensor {:?} is bitsandbytes quantization state: the checkpoint is already quantized", t.name),
            ));
        }
    }

    let mut tensors = Vec::new();
    let mut default_set = HashSet::new();
    for (shard, t) in checkpoint.tensors() {
        let (quantize, mut reason) = match opts.dequantize_only {
            true => (false, "--dequantize-only".to_string()),
            false => decide(t, &opts.include, &opts.exclude),
        };
        let transposed = quantize && stored_transposed(conv1d, &t.name, &t.shape);
        if transposed {
            reason.push_str(" (Conv1D, transposed)");
        }
        if decide(t, &[], &[]).0 {
            default_set.insert(t.name.clone());
        }
        let bytes_out = if quantize {
            let dtype = t.dtype.as_float().expect("quantizable");
            quantized_bytes(t.numel(), json_len_estimate(&t.shape, dtype, opts), opts)
        } else {
            t.nbytes() as u64
        };
        let file = &checkpoint.files[shard];
        tensors.push(TensorPlan {
            name: t.name.clone(),
            shard,
            dtype: t.dtype,
            stored: file.stored_type(t),
            shape: t.shape.clone(),
            quantize,
            transposed,
            reason,
            bytes_in: file.stored_bytes(t) as u64,
            bytes_out,
        });
    }
    for p in &opts.include {
        if !checkpoint.tensors().any(|(_, t)| quantizable(t).is_ok() && glob_match(p, &t.name)) {
            return Err(Error::unsupported(format!(
                "--include {p:?} matches no rank-2 float tensor; patterns are globs on full tensor names, e.g. \"*.mlp.*\""
            )));
        }
    }
    for p in &opts.exclude {
        if !checkpoint.tensors().any(|(_, t)| glob_match(p, &t.name)) {
            return Err(Error::unsupported(format!(
                "--exclude {p:?} matches no tensor; patterns are globs on full tensor names, e.g. \"*.mlp.*\""
            )));
        }
    }
    // Generated names must not collide with existing tensors.
    let suffixes = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"];
    for tp in tensors.iter().filter(|t| t.quantize) {
        for s in suffixes {
            let n = format!("{}{s}", tp.name);
            if checkpoint.tensor(&n).is_some() {
                return Err(Error::format(
                    &checkpoint.source.path,
                    format!("tensor {n:?} already exists, so {:?} cannot be quantized in bitsandbytes' layout", tp.name),
                ));
            }
        }
    }

    let quantized: HashSet<&str> = tensors.iter().filter(|t| t.quantize).map(|t| t.name.as_str()).collect();
    let same_as_default = quantized.len() == default_set.len() && default_set.iter().all(|n| quantized.contains(n.as_str()));
    let skip_modules = if same_as_default || opts.dequantize_only {
        None
    } else {
        // transformers converts every nn.Linear not listed here; an explicit list replaces its
        // default skips, so it names every kept rank-2 weight and the usual output head.
        let mut mods: Vec<String> = tensors
            .iter()
            .filter(|t| !t.quantize && t.shape.len() == 2 && t.name.ends_with(".weight"))
            .map(|t| t.name.trim_end_matches(".weight").to_string())
            .collect();
        if !quantized.contains("lm_head.weight") && !mods.iter().any(|m| m == "lm_head") {
            mods.push("lm_head".into());
        }
        mods.sort();
        mods.dedup();
        Some(mods)
    };

    let single_file = match dst {
        Some(d) => d.extension().is_some_and(|e| e == "safetensors"),
        None => false,
    };
    if single_file && checkpoint.files.len() > 1 {
        return Err(Error::unsupported(format!(
            "{}: a sharded checkpoint converts to a directory, not to a single .safetensors file",
            dst.expect("single_file implies dst").display()
        )));
    }
    let dst = match dst {
        Some(d) => d.to_path_buf(),
        None if opts.dequantize_only => sibling_destination(src, opts.dtype.unwrap_or(DType::BF16).name()),
        None => default_destination(src, opts.quant_type),
    };
    // Never let the output (or --force) clobber the input.
    let dst_abs = absolute(&dst);
    for p in checkpoint.source.shards.iter().chain(checkpoint.source.dir.iter()) {
        let p = absolute(p);
        if p == dst_abs || p.starts_with(&dst_abs) {
            return Err(Error::unsupported(format!(
                "destination {} would overwrite the source {}; choose another output path",
                dst.display(),
                p.display()
            )));
        }
    }
    let (copy_files, skipped_files) = match &checkpoint.source.dir {
        Some(dir) if !single_file => other_files(dir, &checkpoint.source, &dst_abs)?,
        _ => (Vec::new(), Vec::new()),
    };
    let dst_exists = fs::symlink_metadata(&dst).is_ok();
    Ok(Plan {
        checkpoint,
        dst,
        single_file,
        dst_exists,
        tensors,
        copy_files,
        skipped_files,
        skip_modules,
        options: opts.clone(),
        precomputed: HashMap::new(),
        config_extra: Map::new(),
    })
}

/// Files of a model directory to copy to the output (tokenizer, generation config, ...), and
/// those left out because they hold weights in other formats.
fn other_files(dir: &Path, source: &Source, dst_abs: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut copy = Vec::new();
    let mut skipped = Vec::new();
    let own: HashSet<PathBuf> = source
        .shards
        .iter()
        .cloned()
        .chain(source.index.iter().map(|(p, _)| p.clone()))
        .chain(source.config.iter().cloned())
        .map(|p| absolute(&p))
        .collect();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&here)
            .map_err(|e| Error::io(&here, e))?
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io(&here, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let r = rel.join(&name);
            if name == ".git" || (name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-"))) {
                continue;
            }
            let abs = absolute(&path);
            if abs == dst_abs || abs.starts_with(dst_abs) || own.contains(&abs) {
                continue;
            }
            let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.is_dir() {
                stack.push(r);
            } else if meta.is_file() {
                let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                if ext == "safetensors" || name.ends_with(".safetensors.index.json") || OTHER_WEIGHT_EXTENSIONS.contains(&ext.as_str())
                {
                    skipped.push(r);
                } else {
                    copy.push(r);
                }
            }
        }
    }
    copy.sort();
    skipped.sort();
    Ok((copy, skipped))
}

// ---------------------------------------------------------------------------------------------
// JSON as Python writes it

/// `json.dumps` of a Python float that holds an f64: the shortest repr that round-trips,
/// fixed notation for decimal exponents in [-4, 16), else `1.5e-05` / `1e+16`;
/// NaN and infinities as `NaN`, `Infinity`, `-Infinity`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Python prints the shortest digit string that round-trips and, of two such strings equally near
    // x, the even one. Rust's `{:e}` finds the shortest length but may take the other one of a tie;
    // the exact rounding to that many digits (half to even) is the nearest, and wins if it round-trips
    // (next to a power of two it may not: the gap below x is half the gap above).
    let shortest = format!("{:e}", x.abs());
    let significant = shortest.split('e').next().unwrap_or("").chars().filter(|c| c.is_ascii_digit()).count();
    let nearest = format!("{:.*e}", significant.saturating_sub(1), x.abs());
    let e = if nearest.parse::<f64>() == Ok(x.abs()) { nearest } else { shortest };
    let (mantissa, exp) = e.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // value = 0.DIGITS x 10^decpt
    let body = if -4 < decpt && decpt <= 16 {
        let n = digits.len() as i32;
        if decpt <= 0 {
            format!("0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt >= n {
            format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
        } else {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        }
    } else {
        let m = if digits.len() == 1 { digits.clone() } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        let e = decpt - 1;
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

/// bitsandbytes' JSON quantization state, byte for byte as `json.dumps` writes it.
pub fn quant_state_json(
    quant_type: QuantType,
    blocksize: usize,
    dtype: DType,
    shape: &[usize],
    nested_offset: Option<f32>,
) -> String {
    let dims = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {blocksize}, \"dtype\": \"{}\", \"shape\": [{dims}]",
        quant_type.name(),
        dtype.name()
    );
    if let Some(offset) = nested_offset {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(offset as f64)
        ));
    }
    s.push('}');
    s
}

/// `json.dumps(value, indent=2, sort_keys=True)` (ensure_ascii on), as transformers writes
/// config.json and the shard index.
pub fn python_json_dumps(value: &Value) -> String {
    let mut out = String::new();
    dump_value(value, 0, &mut out);
    out
}

fn dump_value(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => dump_string(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&"  ".repeat(level + 1));
                dump_value(item, level + 1, out);
            }
            out.push('\n');
            out.push_str(&"  ".repeat(level));
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&"  ".repeat(level + 1));
                dump_string(k, out);
                out.push_str(": ");
                dump_value(&m[k], level + 1, out);
            }
            out.push('\n');
            out.push_str(&"  ".repeat(level));
            out.push('}');
        }
    }
}

fn dump_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// The `quantization_config` transformers writes for bitsandbytes 4-bit.
fn quantization_config(opts: &ConvertOptions, skip_modules: &Option<Vec<String>>) -> Value {
    let mut q = Map::new();
    q.insert("_load_in_4bit".into(), Value::Bool(true));
    q.insert("_load_in_8bit".into(), Value::Bool(false));
    q.insert("bnb_4bit_compute_dtype".into(), Value::String(opts.compute_dtype.name().into()));
    q.insert("bnb_4bit_quant_storage".into(), Value::String("uint8".into()));
    q.insert("bnb_4bit_quant_type".into(), Value::String(opts.quant_type.name().into()));
    q.insert("bnb_4bit_use_double_quant".into(), Value::Bool(opts.double_quant));
    q.insert("llm_int8_enable_fp32_cpu_offload".into(), Value::Bool(false));
    q.insert("llm_int8_has_fp16_weight".into(), Value::Bool(false));
    q.insert(
        "llm_int8_skip_modules".into(),
        match skip_modules {
            None => Value::Null,
            Some(m) => Value::Array(m.iter().map(|s| Value::String(s.clone())).collect()),
        },
    );
    q.insert("llm_int8_threshold".into(), Value::from(6.0f64));
    q.insert("load_in_4bit".into(), Value::Bool(true));
    q.insert("load_in_8bit".into(), Value::Bool(false));
    q.insert("quant_method".into(), Value::String("bitsandbytes".into()));
    Value::Object(q)
}

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
fn cancelled(dst: &Path) -> Error {
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

fn write_output(
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

/// Names of the files directly in `dir`, sorted.
fn staged_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        names.push(PathBuf::from(e.file_name()));
    }
    names.sort();
    Ok(names)
}

/// Reads and removes a JSON object file, if there is one.
fn take_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(Error::format(path, "expected a JSON object")),
    }
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| Error::io(path, e))?;
    io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// config.json of the output: the source's, plus `quantization_config` and `dtype`.
fn output_config(mut cfg: Map<String, Value>, plan: &Plan) -> Map<String, Value> {
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
fn dominant_float_dtype(plan: &Plan) -> Option<DType> {
    let mut bytes: HashMap<DType, u64> = HashMap::new();
    for t in &plan.tensors {
        if let Some(d) = t.dtype.as_float() {
            *bytes.entry(d).or_default() += t.bytes_in;
        }
    }
    bytes.into_iter().max_by_key(|&(_, b)| b).map(|(d, _)| d)
}

/// The temporary sibling of the destination, removed on drop unless committed.
struct Staging {
    dst: PathBuf,
    tmp: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl Staging {
    fn begin(dst: &Path, is_dir: bool, force: bool) -> Result<Staging> {
        let name = dst
            .file_name()
            .ok_or_else(|| Error::unsupported(format!("destination {} has no file name", dst.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match fs::metadata(&parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(&parent, io::Error::new(io::ErrorKind::NotADirectory, "not a directory (parent of the destination)")))
            }
            Err(e) => return Err(Error::io(&parent, e)),
        }
        if !force && fs::symlink_metadata(dst).is_ok() {
            return Err(Error::Exists { path: dst.to_path_buf() });
        }
        remove_stale_temporaries(&parent, &name);
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if fs::symlink_metadata(&tmp).is_ok() {
            remove_path(&tmp);
        }
        if is_dir {
            fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(Staging { dst: dst.to_path_buf(), tmp, is_dir, committed: false })
    }

    fn commit(mut self, sync: bool) -> Result<()> {
        if sync && self.is_dir {
            sync_dir(&self.tmp);
        }
        let io = |p: &Path, e| Error::io(p, e);
        if fs::symlink_metadata(&self.dst).is_ok() {
            // --force: swap the old output out, the new one in, then delete the old one.
            let parent = self.tmp.parent().expect("tmp has a parent").to_path_buf();
            let name = self.dst.file_name().expect("checked").to_string_lossy().into_owned();
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            remove_path(&old);
            fs::rename(&self.dst, &old).map_err(|e| io(&self.dst, e))?;
            if let Err(e) = fs::rename(&self.tmp, &self.dst) {
                let _ = fs::rename(&old, &self.dst);
                return Err(io(&self.dst, e));
            }
            remove_path(&old);
        } else {
            fs::rename(&self.tmp, &self.dst).map_err(|e| io(&self.dst, e))?;
        }
        self.committed = true;
        if sync {
            if let Some(p) = self.dst.parent() {
                sync_dir(if p.as_os_str().is_empty() { Path::new(".") } else { p });
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            remove_path(&self.tmp);
        }
    }
}

fn remove_path(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn sync_dir(p: &Path) {
    // Directory fsync makes the rename durable on POSIX; not supported everywhere, so best effort.
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

/// Removes `.<name>.tmp-<pid>` siblings left by conversions that were killed (their process no
/// longer exists). Only checkable where /proc exists; elsewhere they are left alone.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_path(&e.path());
        }
    }
}

struct Run<'a, 'p> {
    plan: &'a Plan,
    pool: Option<&'a rayon::ThreadPool>,
    progress: &'p mut dyn FnMut(&Progress<'_>) -> bool,
    bytes_done: u64,
    bytes_total: u64,
    tensors_done: usize,
    summary: Summary,
}

/// The output tensors of one quantized weight: (name, bytes), the JSON state first.
type Parts = Vec<(String, Vec<u8>)>;

impl Run<'_, '_> {
    fn tick(&mut self, bytes: u64, tensor: &str, finished: bool) -> Result<()> {
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

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Converts shard `i` into `out`; returns the output tensor names with their byte sizes.
    fn shard(&mut self, i: usize, file: &TensorFile, out: &Path) -> Result<(Vec<String>, u64)> {
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
    fn window(&mut self, file: &TensorFile, window: &[&TensorPlan], w: &mut SafetensorsWriter, pending: &mut Parts) -> Result<()> {
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
    fn copy(&mut self, file: &TensorFile, tp: &TensorPlan, w: &mut SafetensorsWriter) -> Result<()> {
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

fn quantized_names(name: &str, opts: &ConvertOptions) -> Vec<String> {
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

fn quantized_specs(tp: &TensorPlan, opts: &ConvertOptions) -> Vec<TensorSpec> {
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

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
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

    fn slice(&self) -> FloatSlice<'_> {
        match self {
            Floats::View(v) => *v,
            Floats::F32(v) => FloatSlice::F32(v),
            Floats::F16(v) => FloatSlice::F16(v),
            Floats::BF16(v) => FloatSlice::BF16(v),
        }
    }
}

/// The transpose of a row-major [rows, cols] tensor, in tiles that stay in cache.
fn transpose(src: FloatSlice<'_>, rows: usize, cols: usize) -> Floats<'static> {
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
fn quantize_tensor(file: &TensorFile, tp: &TensorPlan, opts: &ConvertOptions) -> Result<Parts> {
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
fn precomputed_parts(file: &TensorFile, tp: &TensorPlan, w: &PrecomputedWeight, opts: &ConvertOptions) -> Result<Parts> {
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
    fn read(path: &Path, json_name: &str, bytes: &[u8]) -> Result<StoredQuantState> {
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

fn component_names(base: &str, qt: &str) -> [String; 6] {
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

fn inspect_checkpoint(ckpt: &Checkpoint) -> Result<Vec<InspectRow>> {
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

/// Fidelity of one tensor of a converted checkpoint against its source.
#[derive(Clone, Debug, Default)]
pub struct CompareRow {
    pub name: String,
    pub shape: Vec<usize>,
    pub quant_type: Option<String>,
    pub numel: u64,
    /// Sum of squares of the source values.
    pub signal: f64,
    /// Sum of squared errors (decoded - source).
    pub noise: f64,
    /// Sum of squares of the decoded values, and of products decoded x source (for the cosine).
    pub decoded: f64,
    pub dot: f64,
    pub max_abs: f64,
    /// "quantized", "identical", "changed", "missing from source", "missing from output",
    /// or a mismatch description.
    pub status: String,
}

#[derive(Clone, Copy, Default)]
struct Stats {
    signal: f64,
    noise: f64,
    decoded: f64,
    dot: f64,
    max_abs: f64,
}

impl Stats {
    fn merge(a: Stats, b: Stats) -> Stats {
        Stats {
            signal: a.signal + b.signal,
            noise: a.noise + b.noise,
            decoded: a.decoded + b.decoded,
            dot: a.dot + b.dot,
            max_abs: a.max_abs.max(b.max_abs),
        }
    }

    fn of<T: Element>(src: &[T], out: &[f32]) -> Stats {
        let mut s = Stats::default();
        for (x, &y) in src.iter().zip(out) {
            let x = x.to_f32() as f64;
            let y = y as f64;
            let e = y - x;
            s.signal += x * x;
            s.noise += e * e;
            s.decoded += y * y;
            s.dot += x * y;
            s.max_abs = s.max_abs.max(e.abs());
        }
        s
    }

    fn of_slice(src: FloatSlice<'_>, lo: usize, out: &[f32]) -> Stats {
        let hi = lo + out.len();
        match src {
            FloatSlice::F32(v) => Stats::of(&v[lo..hi], out),
            FloatSlice::F16(v) => Stats::of(&v[lo..hi], out),
            FloatSlice::BF16(v) => Stats::of(&v[lo..hi], out),
        }
    }
}

/// Decodes every 4-bit weight of `dst` and compares it with the same tensor of `src`; kept
/// tensors are compared byte for byte. `progress` is called after each tensor (false cancels).
pub fn compare(dst: &Path, src: &Path, progress: &mut dyn FnMut(&Progress<'_>) -> bool) -> Result<Vec<CompareRow>> {
    crate::threads::init();
    let out = Checkpoint::open(dst)?;
    let reference = Checkpoint::open(src)?;
    let rows = inspect_checkpoint(&out)?;
    let conv1d = conv1d_model(reference.config()?.as_ref());
    let bytes_total: u64 = rows.iter().map(|r| r.bytes).sum();
    let mut bytes_done = 0u64;
    let mut result = Vec::with_capacity(rows.len());
    let mut seen = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        seen.insert(row.name.clone());
        let r = compare_row(&out, &reference, row, conv1d)?;
        result.push(r);
        bytes_done += row.bytes;
        let p = Progress { bytes_done, bytes_total, tensors_done: i + 1, tensors_total: rows.len(), tensor: &row.name };
        if !progress(&p) {
            return Err(cancelled(dst));
        }
    }
    for (_, t) in reference.tensors() {
        if !seen.contains(&t.name) {
            result.push(CompareRow {
                name: t.name.clone(),
                shape: t.shape.clone(),
                numel: t.numel() as u64,
                status: "missing from output".into(),
                ..CompareRow::default()
            });
        }
    }
    Ok(result)
}

fn compare_row(out: &Checkpoint, reference: &Checkpoint, row: &InspectRow, conv1d: bool) -> Result<CompareRow> {
    let mut r = CompareRow {
        name: row.name.clone(),
        shape: row.shape.clone(),
        numel: row.numel,
        quant_type: row.quant.as_ref().map(|q| q.quant_type.name().to_string()),
        ..CompareRow::default()
    };
    let Some((sfile, st)) = reference.tensor(&row.name) else {
        r.status = "missing from source".into();
        return Ok(r);
    };
    let Some(q) = &row.quant else {
        let (ofile, ot) = out.tensor(&row.name).expect("row from this checkpoint");
        let same = ot.dtype == st.dtype && ot.shape == st.shape && ofile.bytes(ot, 0, ot.nbytes())? == sfile.bytes(st, 0, st.nbytes())?;
        r.status = if same { "identical".into() } else { "changed".into() };
        ofile.release(ot);
        sfile.release(st);
        return Ok(r);
    };
    let Some(sdtype) = st.dtype.as_float() else {
        r.status = format!("source dtype {} is not float", st.dtype.name());
        return Ok(r);
    };
    if st.numel() as u64 != row.numel {
        r.status = format!("source shape {:?} differs", st.shape);
        return Ok(r);
    }
    let get = |suffix: &str| out.tensor(&format!("{}{suffix}", row.name));
    let qt = q.quant_type.name();
    let (pfile, pt) = get("").expect("row from this checkpoint");
    let (mfile, mt) = get(".quant_map").ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no quant_map", row.name)))?;
    if f32_from_le(&mfile.bytes(mt, 0, mt.nbytes())?) != q.quant_type.code().to_vec() {
        r.status = format!("custom {qt} quant_map (not supported)");
        return Ok(r);
    }
    let (afile, at) = get(".absmax").ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no absmax", row.name)))?;
    let n = row.numel as usize;
    let blocks = quant4::num_blocks(n, q.blocksize);
    let absmax: Vec<f32> = match q.nested_offset {
        Some(offset) => {
            let (nfile, nt) = get(".nested_absmax")
                .ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no nested_absmax", row.name)))?;
            let (cfile, ct) = get(".nested_quant_map")
                .ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no nested_quant_map", row.name)))?;
            let map: [f32; 256] = f32_from_le(&cfile.bytes(ct, 0, ct.nbytes())?).try_into().map_err(|_| {
                Error::format(cfile.path(), format!("{:?}.nested_quant_map must hold 256 float32", row.name))
            })?;
            let codes = afile.bytes(at, 0, at.nbytes())?;
            let nested = f32_from_le(&nfile.bytes(nt, 0, nt.nbytes())?);
            if codes.len() != blocks || nested.len() != blockwise8::nested_blocks(blocks) {
                return Err(Error::format(afile.path(), format!("{:?}: absmax sizes do not match shape {:?}", row.name, q.shape)));
            }
            let mut a = vec![0f32; blocks];
            blockwise8::double_dequantize(&codes, &nested, offset, &map, &mut a)?;
            a
        }
        None => f32_from_le(&afile.bytes(at, 0, at.nbytes())?),
    };
    let packed = pfile.bytes(pt, 0, pt.nbytes())?;
    if packed.len() != quant4::packed_len(n) || absmax.len() != blocks {
        return Err(Error::format(pfile.path(), format!("{:?}: packed/absmax sizes do not match shape {:?}", row.name, q.shape)));
    }
    let mut src = sfile.floats(st, sdtype)?;
    if stored_transposed(conv1d, &row.name, &st.shape) {
        src = transpose(src.slice(), st.shape[0], st.shape[1]);
    }
    let src_slice = src.slice();
    let bs = q.blocksize;
    let chunks = n.div_ceil(COMPARE_CHUNK);
    let stats = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let lo = c * COMPARE_CHUNK;
            let hi = (lo + COMPARE_CHUNK).min(n);
            let mut buf = vec![0f32; hi - lo];
            let p = &packed[lo / 2..quant4::packed_len(hi)];
            let a = &absmax[lo / bs..hi.div_ceil(bs)];
            quant4::dequantize_4bit(p, a, q.quant_type, bs, FloatSliceMut::F32(&mut buf)).map(|_| Stats::of_slice(src_slice, lo, &buf))
        })
        .try_reduce(Stats::default, |a, b| Ok(Stats::merge(a, b)))?;
    drop(src);
    pfile.release(pt);
    sfile.release(st);
    r.signal = stats.signal;
    r.noise = stats.noise;
    r.decoded = stats.decoded;
    r.dot = stats.dot;
    r.max_abs = stats.max_abs;
    r.status = "quantized".into();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_crosses_tile_edges() {
        let (rows, cols) = (37, 70); // not multiples of the 32-element tile
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let Floats::F32(t) = transpose(FloatSlice::F32(&v), rows, cols) else { panic!("f32 in, f32 out") };
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], v[r * cols + c]);
            }
        }
    }

    #[test]
    fn conv1d_weights_are_named_by_module() {
        assert!(is_conv1d_weight("transformer.h.0.attn.c_attn.weight"));
        assert!(is_conv1d_weight("transformer.h.11.mlp.c_proj.weight"));
        assert!(!is_conv1d_weight("transformer.h.0.attn.c_attn.bias"));
        assert!(!is_conv1d_weight("transformer.wte.weight"));
        assert!(!is_conv1d_weight("lm_head.weight"));
        let cfg = |mt: &str| serde_json::json!({ "model_type": mt }).as_object().cloned();
        assert!(conv1d_model(cfg("gpt2").as_ref()) && !conv1d_model(cfg("llama").as_ref()) && !conv1d_model(None));
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Expected strings are Python's json.dumps(float(np.float32(x))).
        let cases: [(f32, &str); 14] = [
            (0.051_332_474, "0.05133247375488281"),
            (0.1, "0.10000000149011612"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e-5, "9.999999747378752e-06"),
            (0.0001, "9.999999747378752e-05"),
            (0.00048828125, "0.00048828125"),
            (3.0517578e-5, "3.0517578125e-05"),
            (1e16, "1.0000000272564224e+16"),
            (123456.0, "123456.0"),
            (1.0e15, "999999986991104.0"),
            (f32::MIN_POSITIVE, "1.1754943508222875e-38"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x as f64), want, "{x:e}");
        }
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1234567890123456.0), "1234567890123456.0");
        assert_eq!(python_float_repr(1e-4), "0.0001");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1.5e300), "1.5e+300");
        assert_eq!(python_float_repr(f64::NAN), "NaN");
        assert_eq!(python_float_repr(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn quant_state_json_layout() {
        let j = quant_state_json(QuantType::Nf4, 64, DType::BF16, &[64, 128], Some(0.051_332_474));
        assert_eq!(
            j,
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 128], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.05133247375488281}"
        );
        let j = quant_state_json(QuantType::Fp4, 128, DType::F32, &[3, 5], None);
        assert_eq!(j, "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [3, 5]}");
    }

    #[test]
    fn python_json_dumps_layout() {
        let v: Value = serde_json::from_str(
            r#"{"b": [1, 2.0, 1e-06, "é\n"], "a": {}, "c": [], "d": null, "e": {"y": true, "x": 6.0}}"#,
        )
        .unwrap();
        let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    1e-06,\n    \"\\u00e9\\n\"\n  ],\n  \"c\": [],\n  \
                    \"d\": null,\n  \"e\": {\n    \"x\": 6.0,\n    \"y\": true\n  }\n}";
        assert_eq!(python_json_dumps(&v), want);
    }

    #[test]
    fn glob() {
        assert!(glob_match("*.mlp.*", "model.layers.0.mlp.up_proj.weight"));
        assert!(!glob_match("*.mlp.*", "model.layers.0.self_attn.q_proj.weight"));
        assert!(glob_match("*q_proj*", "a.q_proj.weight"));
        assert!(glob_match("layers.[0-2].*", "layers.1.x"));
        assert!(!glob_match("layers.[!0-2].*", "layers.1.x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("lm_head.weight", "lm_head.weight"));
        assert!(!glob_match("lm_head", "lm_head.weight"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a[b", "a[b"));
    }

    fn write_source(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let specs = tensors
            .iter()
            .map(|(n, shape, _)| TensorSpec { name: n.to_string(), dtype: TensorDtype::BF16, extent: Extent::Shape(shape.clone()) })
            .collect();
        let mut w = SafetensorsWriter::create(path, vec![("format".into(), "pt".into())], specs).unwrap();
        for (n, _, v) in tensors {
            let bytes: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
            w.write(n, &bytes).unwrap();
        }
        w.finish(false).unwrap();
    }

    #[test]
    fn convert_inspect_compare_end_to_end() {
        let dir = std::env::temp_dir().join(format!("qlora-rs-convert-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.safetensors");
        let w: Vec<f32> = (0..48 * 70).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
        write_source(
            &src,
            &[("l.weight", vec![48, 70], w.clone()), ("l.bias", vec![48], vec![0.5; 48]), ("emb.embed_tokens.weight", vec![4, 8], vec![1.0; 32])],
        );
        let dst = dir.join("out");
        let mut calls = 0;
        let s = convert(&src, Some(&dst), &ConvertOptions::default(), &mut |_| {
            calls += 1;
            true
        })
        .unwrap();
        assert_eq!((s.tensors_quantized, s.tensors_kept, calls), (1, 2, 3));
        let out = SafetensorsFile::open(&dst.join(SINGLE_FILE)).unwrap();
        // The packed weight is what the core produces for the same bf16 values.
        let bf: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let mut packed = vec![0u8; quant4::packed_len(w.len())];
        let mut absmax = vec![0f32; quant4::num_blocks(w.len(), 64)];
        quant4::quantize_4bit(FloatSlice::BF16(&bf), QuantType::Nf4, 64, false, &mut packed, &mut absmax).unwrap();
        assert_eq!(out.data(out.get("l.weight").unwrap()), &packed[..]);
        assert_eq!(out.get("l.weight.absmax").unwrap().dtype, TensorDtype::U8);
        let json = out.data(out.get("l.weight.quant_state.bitsandbytes__nf4").unwrap());
        assert!(std::str::from_utf8(json).unwrap().starts_with("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [48, 70]"));

        let rows = inspect(&dst).unwrap();
        let q = rows.iter().find(|r| r.name == "l.weight").unwrap();
        assert_eq!((q.shape.clone(), q.numel), (vec![48, 70], 48 * 70));
        assert!(q.quant.as_ref().unwrap().nested_offset.is_some());
        let cmp = compare(&dst, &src, &mut |_| true).unwrap();
        let c = cmp.iter().find(|r| r.name == "l.weight").unwrap();
        let sqnr = 10.0 * (c.signal / c.noise).log10();
        assert!(c.status == "quantized" && sqnr > 15.0 && sqnr < 30.0, "{sqnr}");
        assert_eq!(cmp.iter().find(|r| r.name == "l.bias").unwrap().status, "identical");

        // An existing destination is an error unless forced; a cancelled run leaves nothing.
        let e = convert(&src, Some(&dst), &ConvertOptions::default(), &mut |_| true).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }));
        let forced = ConvertOptions { force: true, ..ConvertOptions::default() };
        let e = convert(&src, Some(&dir.join("cancelled")), &forced, &mut |_| false).unwrap_err();
        assert!(e.to_string().contains("interrupted"));
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");

        // A NaN names the file and the tensor.
        let mut bad = w.clone();
        bad[100] = f32::NAN;
        let nan_src = dir.join("nan.safetensors");
        write_source(&nan_src, &[("x.weight", vec![48, 70], bad)]);
        let e = convert(&nan_src, Some(&dir.join("nan-out")), &ConvertOptions::default(), &mut |_| true).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("nan.safetensors") && msg.contains("\"x.weight\"") && msg.contains("flat index 100"), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_selection() {
        let t = |name: &str, shape: Vec<usize>, dtype| TensorInfo { name: name.into(), dtype, shape, begin: 0, end: 0 };
        let q = |t: &TensorInfo| decide(t, &[], &[]).0;
        assert!(q(&t("model.layers.0.self_attn.q_proj.weight", vec![8, 8], TensorDtype::BF16)));
        assert!(q(&t("pooler.dense.weight", vec![8, 8], TensorDtype::F32)));
        assert!(!q(&t("model.embed_tokens.weight", vec![8, 8], TensorDtype::BF16)));
        assert!(!q(&t("embeddings.word_embeddings.weight", vec![8, 8], TensorDtype::F32)));
        assert!(!q(&t("lm_head.weight", vec![8, 8], TensorDtype::BF16)));
        assert!(!q(&t("model.norm.weight", vec![8], TensorDtype::BF16)));
        assert!(!q(&t("x.dense.bias", vec![8], TensorDtype::F32)));
        assert!(!q(&t("x.dense.weight", vec![8, 8], TensorDtype::I64)));
        assert!(!q(&t("x.conv.weight", vec![8, 8, 3, 3], TensorDtype::F32)));
        let inc = vec!["lm_head.weight".to_string()];
        assert!(decide(&t("lm_head.weight", vec![8, 8], TensorDtype::BF16), &inc, &[]).0);
        assert!(!decide(&t("a.q_proj.weight", vec![8, 8], TensorDtype::BF16), &inc, &[]).0);
    }
}
