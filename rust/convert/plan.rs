//! The plan of a conversion: every tensor's fate, the output layout, the files copied or left out;
//! computed from the headers alone (`--dry-run`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::blockwise8;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};
use crate::safetensors::TensorDtype;

use super::*;

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
    pub(crate) fn float_bytes(&self) -> u64 {
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
pub(crate) fn sibling_destination(src: &Path, suffix: &str) -> PathBuf {
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
pub(crate) fn normalize(p: &Path) -> PathBuf {
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

pub(crate) fn absolute(p: &Path) -> PathBuf {
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

pub(crate) fn json_max_len(shape: &[usize], dtype: DType, opts: &ConvertOptions) -> usize {
    // The float repr of the offset is at most 24 characters ("-1.2345678901234567e-308").
    quant_state_json(opts.quant_type, opts.blocksize, dtype, shape, opts.double_quant.then_some(0.0)).len() + 24
}

/// The usual JSON length (offsets print with about 19 characters).
pub(crate) fn json_len_estimate(shape: &[usize], dtype: DType, opts: &ConvertOptions) -> usize {
    let offset = if opts.double_quant { Some(0.0) } else { None };
    quant_state_json(opts.quant_type, opts.blocksize, dtype, shape, offset).len() + if opts.double_quant { 16 } else { 0 }
}

/// Output bytes of one quantized tensor of `numel` elements (plus its JSON state).
pub(crate) fn quantized_bytes(numel: usize, json_len: usize, opts: &ConvertOptions) -> u64 {
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

    let include = Globs::new(&opts.include, "--include")?;
    let exclude = Globs::new(&opts.exclude, "--exclude")?;
    let none = Globs::default();
    let mut tensors = Vec::new();
    let mut default_set = HashSet::new();
    for (shard, t) in checkpoint.tensors() {
        let (quantize, mut reason) = match opts.dequantize_only {
            true => (false, "--dequantize-only".to_string()),
            false => decide(t, &include, &exclude),
        };
        let transposed = quantize && stored_transposed(conv1d, &t.name, &t.shape);
        if transposed {
            reason.push_str(" (Conv1D, transposed)");
        }
        if decide(t, &none, &none).0 {
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
    for (p, m) in include.iter() {
        if !checkpoint.tensors().any(|(_, t)| quantizable(t).is_ok() && m.is_match(&t.name)) {
            return Err(Error::unsupported(format!(
                "--include {p:?} matches no rank-2 float tensor; patterns are globs on full tensor names, e.g. \"*.mlp.*\""
            )));
        }
    }
    for (p, m) in exclude.iter() {
        if !checkpoint.tensors().any(|(_, t)| m.is_match(&t.name)) {
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
pub(crate) fn other_files(dir: &Path, source: &Source, dst_abs: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
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
