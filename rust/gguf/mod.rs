//! GGUF files (versions 2 and 3): a memory-mapped reader that validates the whole header before any
//! tensor is read ([`GgufFile`]), the block decoders ([`decode`]), and the view of a GGUF model as
//! the float tensors transformers' GGUF loader makes of it ([`GgufSource`], names in [`names`]).
//!
//! Layout, all little-endian: the magic `GGUF`, a u32 version, a u64 tensor count and a u64
//! metadata count; the metadata (key string, u32 value type, value); the tensor infos (name string,
//! u32 dimension count, u64 dimensions fastest-moving first, u32 ggml type, u64 offset into the
//! data section); padding up to `general.alignment` (default 32); the data section. A string is a
//! u64 byte length and that many UTF-8 bytes; an array is a u32 element type, a u64 count and the
//! elements.

pub mod decode;
mod ggml_type;
pub mod names;
mod source;

use std::collections::HashSet;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

pub use ggml_type::GgmlType;
pub use source::{inspect, GgufInspectRow, GgufSource};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// The alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed; deeper nesting than this is refused (a hostile file could
/// otherwise recurse without end).
const MAX_ARRAY_DEPTH: usize = 4;

/// Smallest encodings, used to refuse counts that cannot fit in the file before allocating.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// A non-negative integer value of any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file as its header describes it.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as stored: fastest-moving first (ggml's `ne`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the data section.
    pub offset: u64,
    pub nbytes: u64,
}

impl GgufTensor {
    /// The shape in torch order (slowest-moving first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (the fastest-moving dimension).
    pub fn row_len(&self) -> usize {
        self.dims[0] as usize
    }

    pub fn rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }

    pub fn row_bytes(&self) -> usize {
        self.ggml_type.row_bytes(self.dims[0]).expect("validated when the header was read") as usize
    }
}

/// A GGUF file opened for reading: validated header and a read-only memory map.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub alignment: u64,
    /// Where the data section starts in the file.
    pub data_start: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<GgufTensor>,
}

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC
}

impl GgufFile {
    /// Opens and memory-maps `path` and validates its whole header: every count, string and array
    /// length against the file size, every tensor's type, shape, alignment and extent, and that no
    /// two tensors overlap. Every problem is a one-line `Error::Format` naming the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, too short for a GGUF header (24 bytes: magic, version, counts); truncated?"),
            ));
        }
        // SAFETY: a read-only map; like every mmap-based reader we rely on the file not being
        // truncated or rewritten while it is open (the source is never modified by this crate).
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_header(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            tensors: header.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Tensors in header order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The stored bytes of a tensor of this file.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        let begin = (self.data_start + t.offset) as usize;
        &self.mmap[begin..begin + t.nbytes as usize]
    }

    /// Asks the kernel to read a tensor's bytes ahead (no effect on resident memory).
    pub fn prefetch(&self, t: &GgufTensor) {
        #[cfg(unix)]
        if t.nbytes > 0 {
            let _ = self.mmap.advise_range(memmap2::Advice::WillNeed, (self.data_start + t.offset) as usize, t.nbytes as usize);
        }
        let _ = t;
    }

    /// Drops a tensor's pages from this process's resident set (they stay in the page cache).
    pub fn release(&self, t: &GgufTensor) {
        #[cfg(unix)]
        if t.nbytes > 0 {
            // SAFETY: a read-only shared file mapping: MADV_DONTNEED only drops page-table entries and
            // later reads fault the same file contents back in.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    (self.data_start + t.offset) as usize,
                    t.nbytes as usize,
                )
            };
        }
        let _ = t;
    }
}

struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<GgufTensor>,
}

/// Reads little-endian values from the header, each read checked against the end of the file.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "{} needs {n} bytes at offset {} but the file ends at {}; truncated, or the header is corrupt",
                    what(),
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let n = self.u64(&|| format!("the length of {}", what()))?;
        if n > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "{} has length {n} (at offset {at}) but only {} bytes follow in the file; the header is corrupt",
                    what(),
                    self.remaining()
                ),
            ));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::format(self.path, format!("{} (at offset {at}) is not valid UTF-8: {e}", what())))
    }

    fn fail<T>(&self, message: String) -> Result<T> {
        Err(Error::format(self.path, message))
    }
}

fn parse_header(path: &Path, buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { path, buf, pos: 0 };
    let magic = c.array::<4>(&|| "the magic".into())?;
    if &magic != MAGIC {
        return c.fail(format!("not a GGUF file: it starts with {magic:02x?}, not the magic \"GGUF\""));
    }
    let version = c.u32(&|| "the version".into())?;
    if version != 2 && version != 3 {
        let hint = if version == 1 {
            " (version 1 counted with 32-bit integers; convert the file with a current llama.cpp)".to_string()
        } else if matches!(version.swap_bytes(), 2 | 3) {
            " (a big-endian file; only little-endian GGUF files are supported)".to_string()
        } else {
            String::new()
        };
        return c.fail(format!("unsupported GGUF version {version}; expected 2 or 3{hint}"));
    }
    let tensor_count = c.u64(&|| "the tensor count".into())?;
    let kv_count = c.u64(&|| "the metadata count".into())?;
    let need = kv_count.checked_mul(MIN_KV_BYTES).zip(tensor_count.checked_mul(MIN_TENSOR_INFO_BYTES));
    if need.and_then(|(a, b)| a.checked_add(b)).is_none_or(|n| n > c.remaining()) {
        return c.fail(format!(
            "the header declares {kv_count} metadata entries and {tensor_count} tensors, more than the remaining {} bytes \
             of the file can hold; truncated, or the header is corrupt",
            c.remaining()
        ));
    }

    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut keys = HashSet::new();
    for i in 0..kv_count {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let vtype = c.u32(&|| format!("the value type of metadata {key:?}"))?;
        let value = read_value(&mut c, &key, vtype, 0)?;
        if !keys.insert(key.clone()) {
            return c.fail(format!("metadata key {key:?} appears twice"));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
            _ => return c.fail(format!("general.alignment is {v:?}; expected a power of two (default {DEFAULT_ALIGNMENT})")),
        },
    };

    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let what = |field: &str| format!("{field} of tensor {name:?}");
        let n_dims = c.u32(&|| what("the dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return c.fail(format!("tensor {name:?} has {n_dims} dimensions; expected 1 to {MAX_DIMS}"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| what(&format!("dimension {d}")))?);
        }
        let type_id = c.u32(&|| what("the type"))?;
        let offset = c.u64(&|| what("the data offset"))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return c.fail(format!("tensor {name:?} has unknown ggml type {type_id}; not a tensor type ggml defines"));
        };
        let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= (isize::MAX as u64) / 4);
        let Some(numel) = numel else {
            return c.fail(format!("tensor {name:?} has dimensions {dims:?}, whose product overflows"));
        };
        let Some(row_bytes) = ggml_type.row_bytes(dims[0]) else {
            return c.fail(format!(
                "tensor {name:?} ({}) has rows of {} elements, not a whole number of {}-element blocks",
                ggml_type.name, dims[0], ggml_type.block_len
            ));
        };
        let rows = numel.checked_div(dims[0]).unwrap_or(0);
        let nbytes = row_bytes * rows;
        if !names.insert(name.clone()) {
            return c.fail(format!("tensor {name:?} is listed twice"));
        }
        tensors.push(GgufTensor { name, dims, ggml_type, offset, nbytes });
    }

    let end_of_infos = c.pos as u64;
    let data_start = end_of_infos.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return c.fail(format!(
                "tensor {:?}: data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
        let end = data_start.checked_add(t.offset).and_then(|b| b.checked_add(t.nbytes));
        if end.is_none_or(|e| e > file_len) {
            return c.fail(format!(
                "tensor {:?} ({}, {} bytes at data offset {}) goes beyond the end of the {file_len}-byte file \
                 (data section at {data_start}); truncated, or the header is wrong",
                t.name, t.ggml_type.name, t.nbytes, t.offset
            ));
        }
    }
    let mut by_offset: Vec<&GgufTensor> = tensors.iter().filter(|t| t.nbytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        if w[0].offset + w[0].nbytes > w[1].offset {
            return c.fail(format!(
                "tensors {:?} (data offsets {}..{}) and {:?} (from {}) overlap",
                w[0].name,
                w[0].offset,
                w[0].offset + w[0].nbytes,
                w[1].name,
                w[1].offset
            ));
        }
    }
    Ok(Header { version, alignment, data_start, metadata, tensors })
}

/// Fixed size of a scalar value type, or None for strings, arrays and unknown types.
fn scalar_size(vtype: u32) -> Option<u64> {
    match vtype {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_value(c: &mut Cursor<'_>, key: &str, vtype: u32, depth: usize) -> Result<MetaValue> {
    let what = || format!("the value of metadata {key:?}");
    Ok(match vtype {
        0 => MetaValue::U8(c.array::<1>(&what)?[0]),
        1 => MetaValue::I8(c.array::<1>(&what)?[0] as i8),
        2 => MetaValue::U16(u16::from_le_bytes(c.array(&what)?)),
        3 => MetaValue::I16(i16::from_le_bytes(c.array(&what)?)),
        4 => MetaValue::U32(u32::from_le_bytes(c.array(&what)?)),
        5 => MetaValue::I32(i32::from_le_bytes(c.array(&what)?)),
        6 => MetaValue::F32(f32::from_le_bytes(c.array(&what)?)),
        7 => match c.array::<1>(&what)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return c.fail(format!("metadata {key:?} is a bool stored as {b}; expected 0 or 1")),
        },
        8 => MetaValue::String(c.string(&what)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return c.fail(format!("metadata {key:?} nests arrays more than {MAX_ARRAY_DEPTH} deep"));
            }
            let etype = c.u32(&|| format!("the element type of metadata {key:?}"))?;
            let count = c.u64(&|| format!("the element count of metadata {key:?}"))?;
            let min = match (etype, scalar_size(etype)) {
                (_, Some(n)) => n,
                (8, None) => 8,
                (9, None) => 12,
                _ => return c.fail(format!("metadata {key:?} is an array of unknown value type {etype}")),
            };
            if count.checked_mul(min).is_none_or(|n| n > c.remaining()) {
                return c.fail(format!(
                    "metadata {key:?} declares {count} array elements, more than the remaining {} bytes of the file \
                     can hold; truncated, or the header is corrupt",
                    c.remaining()
                ));
            }
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                items.push(read_value(c, key, etype, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(u64::from_le_bytes(c.array(&what)?)),
        11 => MetaValue::I64(i64::from_le_bytes(c.array(&what)?)),
        12 => MetaValue::F64(f64::from_le_bytes(c.array(&what)?)),
        _ => return c.fail(format!("metadata {key:?} has unknown value type {vtype}")),
    })
}

#[cfg(test)]
mod tests;
