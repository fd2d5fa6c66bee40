//! Where the tensors come from: a safetensors checkpoint (one file or a sharded index) or a GGUF
//! model, seen through one [`Checkpoint`] interface.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::safetensors::{SafetensorsFile, TensorInfo};
use crate::tensor_file::TensorFile;

use super::*;

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

    pub(crate) fn shard_name(&self, i: usize) -> String {
        file_name(&self.shards[i])
    }
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// An opened checkpoint: every shard mapped and validated, names unique across shards.
#[derive(Debug)]
pub struct Checkpoint {
    pub source: Source,
    pub files: Vec<TensorFile>,
    pub(crate) names: HashMap<String, (usize, usize)>,
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

    pub(crate) fn config(&self) -> Result<Option<Map<String, Value>>> {
        let Some(path) = &self.source.config else { return Ok(None) };
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(Error::format(path, "expected a JSON object")),
            Err(e) => Err(Error::format(path, format!("not valid JSON: {e}"))),
        }
    }
}
