//! safetensors files: a memory-mapped reader that validates the whole header before any tensor is
//! touched, and an incremental writer that puts tensors in place as they are produced.
//!
//! Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
//! (`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`,
//! offsets relative to the data section), then the data section. Files written by the safetensors
//! library order tensors by dtype (widest first) then name, so every tensor is aligned to its
//! element size, and pad the header with spaces to a multiple of 8; the writer does the same.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest header the reader accepts (the safetensors library's limit).
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// Element types of the safetensors format. The declaration order is the library's: writers sort
/// tensors by this order, descending, so that wider types come first.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorDtype {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl TensorDtype {
    pub const ALL: [TensorDtype; 20] = [
        TensorDtype::BOOL,
        TensorDtype::F4,
        TensorDtype::F6_E2M3,
        TensorDtype::F6_E3M2,
        TensorDtype::U8,
        TensorDtype::I8,
        TensorDtype::F8_E5M2,
        TensorDtype::F8_E4M3,
        TensorDtype::F8_E8M0,
        TensorDtype::I16,
        TensorDtype::U16,
        TensorDtype::F16,
        TensorDtype::BF16,
        TensorDtype::I32,
        TensorDtype::U32,
        TensorDtype::F32,
        TensorDtype::C64,
        TensorDtype::F64,
        TensorDtype::I64,
        TensorDtype::U64,
    ];

    /// The dtype tag of a header (`"BF16"`), or None for a tag this reader does not know.
    pub fn parse(tag: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|d| d.name() == tag)
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorDtype::BOOL => "BOOL",
            TensorDtype::F4 => "F4",
            TensorDtype::F6_E2M3 => "F6_E2M3",
            TensorDtype::F6_E3M2 => "F6_E3M2",
            TensorDtype::U8 => "U8",
            TensorDtype::I8 => "I8",
            TensorDtype::F8_E5M2 => "F8_E5M2",
            TensorDtype::F8_E4M3 => "F8_E4M3",
            TensorDtype::F8_E8M0 => "F8_E8M0",
            TensorDtype::I16 => "I16",
            TensorDtype::U16 => "U16",
            TensorDtype::F16 => "F16",
            TensorDtype::BF16 => "BF16",
            TensorDtype::I32 => "I32",
            TensorDtype::U32 => "U32",
            TensorDtype::F32 => "F32",
            TensorDtype::C64 => "C64",
            TensorDtype::F64 => "F64",
            TensorDtype::I64 => "I64",
            TensorDtype::U64 => "U64",
        }
    }

    /// The torch name of the type (`bfloat16`, `int64`, `float8_e4m3fn`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            TensorDtype::BOOL => "bool",
            TensorDtype::F4 => "float4_e2m1fn_x2",
            TensorDtype::F6_E2M3 => "float6_e2m3",
            TensorDtype::F6_E3M2 => "float6_e3m2",
            TensorDtype::U8 => "uint8",
            TensorDtype::I8 => "int8",
            TensorDtype::F8_E5M2 => "float8_e5m2",
            TensorDtype::F8_E4M3 => "float8_e4m3fn",
            TensorDtype::F8_E8M0 => "float8_e8m0fnu",
            TensorDtype::I16 => "int16",
            TensorDtype::U16 => "uint16",
            TensorDtype::F16 => "float16",
            TensorDtype::BF16 => "bfloat16",
            TensorDtype::I32 => "int32",
            TensorDtype::U32 => "uint32",
            TensorDtype::F32 => "float32",
            TensorDtype::C64 => "complex64",
            TensorDtype::F64 => "float64",
            TensorDtype::I64 => "int64",
            TensorDtype::U64 => "uint64",
        }
    }

    /// Bits per element (sub-byte types pack several elements into a byte).
    pub fn bits(self) -> usize {
        match self {
            TensorDtype::F4 => 4,
            TensorDtype::F6_E2M3 | TensorDtype::F6_E3M2 => 6,
            TensorDtype::BOOL
            | TensorDtype::U8
            | TensorDtype::I8
            | TensorDtype::F8_E5M2
            | TensorDtype::F8_E4M3
            | TensorDtype::F8_E8M0 => 8,
            TensorDtype::I16 | TensorDtype::U16 | TensorDtype::F16 | TensorDtype::BF16 => 16,
            TensorDtype::I32 | TensorDtype::U32 | TensorDtype::F32 => 32,
            TensorDtype::C64 | TensorDtype::F64 | TensorDtype::I64 | TensorDtype::U64 => 64,
        }
    }

    /// Whether the type is a floating-point one (of any width).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            TensorDtype::F4
                | TensorDtype::F6_E2M3
                | TensorDtype::F6_E3M2
                | TensorDtype::F8_E5M2
                | TensorDtype::F8_E4M3
                | TensorDtype::F8_E8M0
                | TensorDtype::F16
                | TensorDtype::BF16
                | TensorDtype::F32
                | TensorDtype::F64
        )
    }

    /// The quantizable element type this corresponds to (float32, float16, bfloat16), if any.
    pub fn as_float(self) -> Option<DType> {
        match self {
            TensorDtype::F32 => Some(DType::F32),
            TensorDtype::F16 => Some(DType::F16),
            TensorDtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn from_float(d: DType) -> Self {
        match d {
            DType::F32 => TensorDtype::F32,
            DType::F16 => TensorDtype::F16,
            DType::BF16 => TensorDtype::BF16,
        }
    }

    /// Bytes `numel` elements take, or None if they do not fill whole bytes or overflow.
    pub fn byte_len(self, numel: usize) -> Option<usize> {
        let bits = numel.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    fn names() -> String {
        Self::ALL.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
    }
}

/// One tensor of a file: name, dtype, shape, and its byte range in the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    /// Byte offsets relative to the start of the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A parsed, validated safetensors header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Tensors in data order (ascending offsets).
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, in file order.
    pub metadata: Vec<(String, String)>,
    /// Where the data section starts in the file (8 + header length).
    pub data_start: usize,
}

impl Header {
    /// Parses and validates a header against the file length. Every problem is a
    /// `Error::Format` naming `path`, the tensor and what was expected.
    pub fn parse(path: &Path, prefix: &[u8], file_len: u64) -> Result<Self> {
        let fmt = |m: String| Error::format(path, m);
        if file_len < 8 {
            return Err(fmt(format!(
                "file is {file_len} bytes, too short for a safetensors file (it starts with an 8-byte header length); truncated?"
            )));
        }
        let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES as u64 {
            return Err(fmt(format!(
                "header length {n} (the first 8 bytes) is above the {MAX_HEADER_BYTES}-byte limit; not a safetensors file?"
            )));
        }
        if 8 + n > file_len {
            return Err(fmt(format!(
                "header length {n} (the first 8 bytes) goes beyond the end of the {file_len}-byte file; truncated or not a safetensors file"
            )));
        }
        let n = n as usize;
        let raw = &prefix[8..8 + n];
        let text = std::str::from_utf8(raw).map_err(|e| {
            fmt(format!("header is not valid UTF-8 (invalid byte at header offset {}); not a safetensors file?", e.valid_up_to()))
        })?;
        if !text.starts_with('{') {
            return Err(fmt("header does not start with '{': not a safetensors file".to_string()));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| fmt(format!("header is not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(fmt("header JSON is not an object".to_string()));
        };
        let data_len = (file_len - 8 - n as u64) as usize;
        let mut tensors = Vec::with_capacity(map.len());
        let mut metadata = Vec::new();
        for (name, entry) in map {
            if name == "__metadata__" {
                let Value::Object(m) = entry else {
                    return Err(fmt("__metadata__ is not an object of strings".to_string()));
                };
                for (k, v) in m {
                    match v {
                        Value::String(s) => metadata.push((k, s)),
                        other => {
                            return Err(fmt(format!("__metadata__ value {k:?} is {other}, expected a string")));
                        }
                    }
                }
                continue;
            }
            tensors.push(parse_entry(path, name, &entry)?);
        }
        validate_layout(path, &mut tensors, data_len)?;
        Ok(Header { tensors, metadata, data_start: 8 + n })
    }
}

/// Reads and validates the header of the safetensors file at `path` with plain reads (no memory
/// map): the file's first 8 + N bytes, nothing of the data section. Errors as [`Header::parse`].
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read as _;
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = vec![0u8; file_len.min(8) as usize];
    file.read_exact(&mut prefix).map_err(|e| Error::io(path, e))?;
    if file_len >= 8 {
        let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        // A length that is too large or runs past the end is reported by Header::parse from the
        // 8 bytes alone; only a plausible one is read.
        if n <= MAX_HEADER_BYTES as u64 && 8 + n <= file_len {
            prefix.resize(8 + n as usize, 0);
            file.read_exact(&mut prefix[8..]).map_err(|e| Error::io(path, e))?;
        }
    }
    Header::parse(path, &prefix, file_len)
}

fn parse_entry(path: &Path, name: String, entry: &Value) -> Result<TensorInfo> {
    let bad = |what: String| Error::format(path, format!("tensor {name:?}: {what}"));
    let Value::Object(e) = entry else {
        return Err(bad(format!("header entry is {entry}, expected an object with dtype, shape and data_offsets")));
    };
    let tag = match e.get("dtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(bad(format!("dtype is {other}, expected a string"))),
        None => return Err(bad("no dtype in its header entry".to_string())),
    };
    let dtype = TensorDtype::parse(tag)
        .ok_or_else(|| bad(format!("unknown dtype {tag:?}; expected one of {}", TensorDtype::names())))?;
    let shape = match e.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_u64().and_then(|v| usize::try_from(v).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(format!("shape {} is not a list of non-negative integers", Value::Array(dims.clone()))))?,
        Some(other) => return Err(bad(format!("shape is {other}, expected a list of integers"))),
        None => return Err(bad("no shape in its header entry".to_string())),
    };
    let offsets = match e.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => {
            o.iter().map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok())).collect::<Option<Vec<usize>>>()
        }
        _ => None,
    }
    .ok_or_else(|| bad("data_offsets must be [begin, end] (two non-negative integers)".to_string()))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if end < begin {
        return Err(bad(format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let expected = numel.and_then(|n| dtype.byte_len(n));
    match expected {
        Some(bytes) if bytes == end - begin => {}
        Some(bytes) => {
            return Err(bad(format!(
                "shape {shape:?} of {} needs {bytes} bytes but data_offsets [{begin}, {end}] hold {}",
                dtype.name(),
                end - begin
            )))
        }
        None => {
            return Err(bad(format!(
                "shape {shape:?} of {} overflows or does not fill whole bytes",
                dtype.name()
            )))
        }
    }
    Ok(TensorInfo { name, dtype, shape, begin, end })
}

/// Tensors must lie inside the data section, must not overlap, and (as the safetensors library
/// requires) must cover it without holes. Sorts `tensors` by offset.
fn validate_layout(path: &Path, tensors: &mut [TensorInfo], data_len: usize) -> Result<()> {
    tensors.sort_by_key(|t| (t.begin, t.end));
    let fmt = |m: String| Error::format(path, m);
    if let Some(t) = tensors.iter().find(|t| t.end > data_len) {
        return Err(fmt(format!(
            "tensor {:?}: data_offsets [{}, {}] go beyond the data section ({data_len} bytes after the header); the file is truncated or the header is wrong",
            t.name, t.begin, t.end
        )));
    }
    let mut pos = 0usize;
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter() {
        if t.begin < pos {
            let p = prev.expect("pos > 0 implies a previous tensor");
            return Err(fmt(format!(
                "tensors {:?} (data_offsets [{}, {}]) and {:?} (data_offsets [{}, {}]) overlap",
                p.name, p.begin, p.end, t.name, t.begin, t.end
            )));
        }
        if t.begin > pos {
            return Err(fmt(format!(
                "tensor {:?} begins at data offset {} but the previous tensor ends at {pos}: {} bytes of the data section belong to no tensor",
                t.name,
                t.begin,
                t.begin - pos
            )));
        }
        // Zero-sized tensors may share an offset with their neighbours.
        if t.end > t.begin {
            pos = t.end;
            prev = Some(t);
        }
    }
    if pos != data_len {
        return Err(fmt(format!(
            "the data section has {data_len} bytes but the tensors end at {pos}: {} trailing bytes belong to no tensor",
            data_len - pos
        )));
    }
    Ok(())
}

/// A safetensors file opened for reading: validated header plus a read-only memory map.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    header: Header,
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Opens and memory-maps `path` and validates its header (see [`Header::parse`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < 8 {
            return Err(Error::format(
                path,
                format!("file is {file_len} bytes, too short for a safetensors file (it starts with an 8-byte header length); truncated?"),
            ));
        }
        // SAFETY: the map is read-only; like every mmap-based reader we rely on the file not being
        // truncated or rewritten while it is open (SRC is never modified by this crate).
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = Header::parse(path, &mmap[..], file_len)?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap: Some(mmap), header, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensors in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn metadata(&self) -> &[(String, String)] {
        &self.header.metadata
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.header.data_start;
        &self.mmap.as_ref().expect("mapped")[start + t.begin..start + t.end]
    }

    /// Bytes `[begin, end)` of the data section.
    pub fn data_range(&self, begin: usize, end: usize) -> &[u8] {
        let start = self.header.data_start;
        &self.mmap.as_ref().expect("mapped")[start + begin..start + end]
    }

    /// Asks the kernel to read a data range ahead (no effect on resident memory).
    pub fn prefetch(&self, begin: usize, end: usize) {
        #[cfg(unix)]
        {
            if let (true, Some(m)) = (end > begin, &self.mmap) {
                let _ = m.advise_range(memmap2::Advice::WillNeed, self.header.data_start + begin, end - begin);
            }
        }
        let _ = (begin, end);
    }

    /// Drops the pages of a data range from this process's resident set (they stay in the page
    /// cache); this is what keeps the peak RSS of a conversion at about one window of tensors.
    pub fn release(&self, begin: usize, end: usize) {
        #[cfg(unix)]
        {
            if let (true, Some(m)) = (end > begin, &self.mmap) {
                // SAFETY: the map is a read-only shared file mapping: MADV_DONTNEED only drops the
                // page-table entries and later reads fault the same file contents back in.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.header.data_start + begin, end - begin)
                };
            }
        }
        let _ = (begin, end);
    }
}

/// How large a tensor handed to [`SafetensorsWriter`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Known now.
    Shape(Vec<usize>),
    /// A 1-D tensor whose byte length is only known when it is written (at most `max_len`),
    /// e.g. bitsandbytes' JSON quantization state.
    Deferred { max_len: usize },
}

/// A tensor the writer will receive.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: TensorDtype,
    pub extent: Extent,
}

#[derive(Debug)]
struct Slot {
    name: String,
    dtype: TensorDtype,
    shape: Option<Vec<usize>>,
    len: Option<usize>,
    max_len: usize,
    offset: Option<usize>,
    written: usize,
}

/// Writes a safetensors file whose tensors arrive one by one, in any order, possibly in pieces.
///
/// The layout is the safetensors library's (dtype descending, then name; header padded with
/// spaces to a multiple of 8). Data goes straight to its final place with positional writes;
/// the header, which holds every offset, is written last into space reserved up front (sized for
/// the largest deferred lengths, padded with spaces). Until [`finish`](Self::finish) the first
/// 8 bytes are zero, so an interrupted file never parses as a safetensors file.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    file: File,
    metadata: Vec<(String, String)>,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    header_len: usize,
    resolved: usize,
    resolved_end: usize,
}

impl SafetensorsWriter {
    /// Creates `path` (which must not exist) for the given tensors.
    pub fn create(path: &Path, metadata: Vec<(String, String)>, specs: Vec<TensorSpec>) -> Result<Self> {
        let mut specs = specs;
        specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let mut index = HashMap::with_capacity(specs.len());
        let mut slots = Vec::with_capacity(specs.len());
        for (i, s) in specs.into_iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(Error::shape(format!("{}: tensor {:?} is written twice", path.display(), s.name)));
            }
            let (shape, len, max_len) = match s.extent {
                Extent::Shape(shape) => {
                    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    let len = numel.and_then(|n| s.dtype.byte_len(n)).ok_or_else(|| {
                        Error::shape(format!("tensor {:?}: shape {shape:?} of {} has no byte size", s.name, s.dtype.name()))
                    })?;
                    (Some(shape), Some(len), len)
                }
                Extent::Deferred { max_len } => (None, None, max_len),
            };
            slots.push(Slot { name: s.name, dtype: s.dtype, shape, len, max_len, offset: None, written: 0 });
        }
        // Reserve room for the largest header the deferred lengths can produce.
        let total_max: usize = slots.iter().map(|s| s.max_len).sum();
        let longest = header_json(&metadata, slots.iter().map(|s| {
            let shape = s.shape.clone().unwrap_or_else(|| vec![s.max_len]);
            (s.name.as_str(), s.dtype, shape, total_max, total_max)
        }));
        let header_len = longest.len().div_ceil(8) * 8;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut w = SafetensorsWriter {
            path: path.to_path_buf(),
            file,
            metadata,
            slots,
            index,
            header_len,
            resolved: 0,
            resolved_end: 0,
        };
        w.resolve();
        write_all_at(&w.file, &[0u8; 8], 0).map_err(|e| Error::io(path, e))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Assigns offsets to every slot whose predecessors all have known lengths.
    fn resolve(&mut self) {
        while self.resolved < self.slots.len() {
            let s = &mut self.slots[self.resolved];
            // A deferred slot is placed as soon as everything before it is; its length is not needed.
            s.offset = Some(self.resolved_end);
            match s.len {
                Some(len) => {
                    self.resolved_end += len;
                    self.resolved += 1;
                }
                None => break,
            }
        }
    }

    fn slot(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| Error::shape(format!("{}: tensor {name:?} is not in the planned layout", self.path.display())))
    }

    /// Fixes the byte length of a deferred tensor (at most its `max_len`).
    pub fn set_len(&mut self, name: &str, len: usize) -> Result<()> {
        let i = self.slot(name)?;
        let s = &mut self.slots[i];
        if s.len.is_some() || len > s.max_len {
            return Err(Error::shape(format!(
                "tensor {name:?}: length {len} cannot be set (already fixed, or above the reserved {} bytes)",
                s.max_len
            )));
        }
        s.len = Some(len);
        s.shape = Some(vec![len / s.dtype.bits().div_ceil(8).max(1)]);
        self.resolve();
        Ok(())
    }

    /// Whether the offset of `name` is known (all tensors before it have known lengths).
    pub fn is_placed(&self, name: &str) -> bool {
        self.index.get(name).is_some_and(|&i| self.slots[i].offset.is_some())
    }

    /// Writes `bytes` at byte `at` of tensor `name`. A deferred tensor written whole at `at == 0`
    /// gets its length from `bytes` if it has none yet.
    pub fn write_at(&mut self, name: &str, at: usize, bytes: &[u8]) -> Result<()> {
        let i = self.slot(name)?;
        if self.slots[i].len.is_none() && at == 0 {
            self.set_len(name, bytes.len())?;
        }
        let s = &self.slots[i];
        let len = s.len.expect("set above");
        if at + bytes.len() > len {
            return Err(Error::shape(format!(
                "tensor {name:?}: writing {} bytes at {at} overruns its {len} bytes",
                bytes.len()
            )));
        }
        let Some(offset) = s.offset else {
            return Err(Error::shape(format!(
                "tensor {name:?} written before the lengths of the tensors ahead of it are known"
            )));
        };
        let pos = (8 + self.header_len + offset + at) as u64;
        write_all_at(&self.file, bytes, pos).map_err(|e| Error::io(&self.path, e))?;
        self.slots[i].written += bytes.len();
        Ok(())
    }

    /// Writes a whole tensor.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_at(name, 0, bytes)
    }

    /// Bytes of tensor data in the file once finished (known when every length is).
    pub fn data_len(&self) -> Option<usize> {
        (self.resolved == self.slots.len()).then_some(self.resolved_end)
    }

    /// Writes the header, flushes the file to disk and closes it. Fails if a tensor is missing.
    pub fn finish(self, sync: bool) -> Result<u64> {
        if let Some(s) = self.slots.iter().find(|s| s.len.is_none_or(|l| s.written != l)) {
            return Err(Error::shape(format!(
                "{}: tensor {:?} was not (fully) written: {} of {} bytes",
                self.path.display(),
                s.name,
                s.written,
                s.len.map_or("?".to_string(), |l| l.to_string())
            )));
        }
        let json = header_json(
            &self.metadata,
            self.slots.iter().map(|s| {
                let off = s.offset.expect("all resolved");
                (s.name.as_str(), s.dtype, s.shape.clone().expect("known"), off, off + s.len.expect("known"))
            }),
        );
        debug_assert!(json.len() <= self.header_len);
        let mut head = Vec::with_capacity(8 + self.header_len);
        head.extend_from_slice(&(self.header_len as u64).to_le_bytes());
        head.extend_from_slice(json.as_bytes());
        head.resize(8 + self.header_len, b' ');
        let io = |e| Error::io(&self.path, e);
        let total = (8 + self.header_len + self.resolved_end) as u64;
        self.file.set_len(total).map_err(io)?;
        // Header bytes after the length prefix first, the prefix last: a crash in between still
        // leaves a file whose first 8 bytes are zero.
        write_all_at(&self.file, &head[8..], 8).map_err(io)?;
        if sync {
            self.file.sync_data().map_err(io)?;
        }
        write_all_at(&self.file, &head[..8], 0).map_err(io)?;
        if sync {
            self.file.sync_all().map_err(io)?;
        }
        let mut file = self.file;
        file.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(total)
    }
}

/// The header JSON as the safetensors library writes it: compact, `__metadata__` first, then the
/// tensors in data order with `dtype`, `shape`, `data_offsets`.
fn header_json<'a>(
    metadata: &[(String, String)],
    tensors: impl Iterator<Item = (&'a str, TensorDtype, Vec<usize>, usize, usize)>,
) -> String {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        map.insert("__metadata__".to_string(), Value::Object(m));
    }
    for (name, dtype, shape, begin, end) in tensors {
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(dtype.name().into()));
        e.insert("shape".into(), Value::Array(shape.into_iter().map(Value::from).collect()));
        e.insert("data_offsets".into(), Value::Array(vec![Value::from(begin), Value::from(end)]));
        map.insert(name.to_string(), Value::Object(e));
    }
    serde_json::to_string(&Value::Object(map)).expect("a JSON value serializes")
}

/// Writes all of `buf` at byte `pos` of `file` without moving a shared cursor.
pub fn write_all_at(file: &File, mut buf: &[u8], mut pos: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        #[cfg(unix)]
        let n = std::os::unix::fs::FileExt::write_at(file, buf, pos);
        #[cfg(windows)]
        let n = std::os::windows::fs::FileExt::seek_write(file, buf, pos);
        match n {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "failed to write whole buffer")),
            Ok(n) => {
                buf = &buf[n..];
                pos += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed when dropped.
    struct Tmp(PathBuf);

    impl std::ops::Deref for Tmp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(name: &str) -> Tmp {
        let dir = std::env::temp_dir().join(format!("qlora-rs-st-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Tmp(dir)
    }

    fn raw_file(dir: &Path, header: &str, data: &[u8]) -> PathBuf {
        let p = dir.join("t.safetensors");
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        std::fs::write(&p, v).unwrap();
        p
    }

    fn open_err(dir: &Path, header: &str, data: &[u8]) -> String {
        let p = raw_file(dir, header, data);
        match SafetensorsFile::open(&p) {
            Ok(_) => panic!("expected an error for {header}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn writer_round_trip_with_deferred_tensor() {
        let dir = tmp("rt");
        let p = dir.join("o.safetensors");
        let specs = vec![
            TensorSpec { name: "b".into(), dtype: TensorDtype::U8, extent: Extent::Shape(vec![3]) },
            TensorSpec { name: "a".into(), dtype: TensorDtype::F32, extent: Extent::Shape(vec![2]) },
            TensorSpec { name: "a.meta".into(), dtype: TensorDtype::U8, extent: Extent::Deferred { max_len: 40 } },
            TensorSpec { name: "c".into(), dtype: TensorDtype::BF16, extent: Extent::Shape(vec![1, 2]) },
        ];
        let mut w = SafetensorsWriter::create(&p, vec![("format".into(), "pt".into())], specs).unwrap();
        assert!(w.is_placed("a") && w.is_placed("c") && w.is_placed("a.meta") && !w.is_placed("b"));
        w.write("c", &[1, 2, 3, 4]).unwrap();
        assert!(w.write("b", &[7, 8, 9]).is_err());
        w.write("a.meta", b"{\"x\": 1}").unwrap();
        w.write("b", &[7, 8, 9]).unwrap();
        w.write_at("a", 4, &2f32.to_le_bytes()).unwrap();
        w.write_at("a", 0, &1f32.to_le_bytes()).unwrap();
        w.finish(false).unwrap();

        let f = SafetensorsFile::open(&p).unwrap();
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "a.meta", "b"]);
        assert_eq!(f.data(f.get("a").unwrap()), [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat());
        assert_eq!(f.data(f.get("a.meta").unwrap()), b"{\"x\": 1}");
        assert_eq!(f.get("a.meta").unwrap().shape, vec![8]);
        assert_eq!(f.data(f.get("b").unwrap()), [7, 8, 9]);
        assert_eq!(f.metadata(), [("format".to_string(), "pt".to_string())]);
        assert_eq!(f.header().data_start % 8, 0);
    }

    #[test]
    fn unfinished_writer_leaves_invalid_file() {
        let dir = tmp("unfinished");
        let p = dir.join("o.safetensors");
        let specs = vec![TensorSpec { name: "a".into(), dtype: TensorDtype::U8, extent: Extent::Shape(vec![4]) }];
        let mut w = SafetensorsWriter::create(&p, vec![], specs).unwrap();
        w.write("a", &[1, 2, 3, 4]).unwrap();
        drop(w);
        assert!(SafetensorsFile::open(&p).is_err());
    }

    #[test]
    fn finish_requires_every_tensor() {
        let dir = tmp("missing");
        let p = dir.join("o.safetensors");
        let specs = vec![TensorSpec { name: "a".into(), dtype: TensorDtype::U8, extent: Extent::Shape(vec![4]) }];
        let w = SafetensorsWriter::create(&p, vec![], specs).unwrap();
        assert!(w.finish(false).unwrap_err().to_string().contains("\"a\" was not (fully) written"));
    }

    #[test]
    fn reader_rejects_bad_headers() {
        let dir = tmp("bad");
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(SafetensorsFile::open(&raw_file(&dir, ok, &[0; 8])).is_ok());

        let e = open_err(&dir, ok, &[0; 4]);
        assert!(e.contains("go beyond the data section"), "{e}");
        let e = open_err(&dir, r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert!(e.contains("unknown dtype \"Q7\""), "{e}");
        let e = open_err(&dir, r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert!(e.contains("needs 12 bytes"), "{e}");
        let e = open_err(
            &dir,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        );
        assert!(e.contains("overlap"), "{e}");
        let e = open_err(&dir, r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#, &[0; 8]);
        assert!(e.contains("not valid JSON"), "{e}");
        let e = open_err(&dir, ok, &[0; 12]);
        assert!(e.contains("trailing bytes"), "{e}");

        let p = dir.join("short.safetensors");
        std::fs::write(&p, [1, 2, 3]).unwrap();
        assert!(SafetensorsFile::open(&p).unwrap_err().to_string().contains("too short"));
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        std::fs::write(&p, v).unwrap();
        assert!(SafetensorsFile::open(&p).unwrap_err().to_string().contains("goes beyond the end"));
        let mut v = 4u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        std::fs::write(&p, v).unwrap();
        assert!(SafetensorsFile::open(&p).unwrap_err().to_string().contains("not valid UTF-8"));
    }
}
