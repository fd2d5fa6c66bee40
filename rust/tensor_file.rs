//! The files a conversion reads tensors from: safetensors files (tensor bytes viewed in place) and
//! GGUF models (tensors decoded on demand to the float tensors transformers would load). The
//! conversion pipeline plans, quantizes and copies through this one interface.

use std::borrow::Cow;
use std::path::Path;

use crate::convert::Floats;
use crate::dtype::{DType, FloatSliceMut};
use crate::error::Result;
use crate::gguf::GgufSource;
use crate::safetensors::{SafetensorsFile, TensorInfo};

#[derive(Debug)]
pub enum TensorFile {
    Safetensors(SafetensorsFile),
    Gguf(GgufSource),
}

impl TensorFile {
    pub fn path(&self) -> &Path {
        match self {
            TensorFile::Safetensors(f) => f.path(),
            TensorFile::Gguf(g) => g.path(),
        }
    }

    /// Tensors in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        match self {
            TensorFile::Safetensors(f) => f.tensors(),
            TensorFile::Gguf(g) => g.tensors(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        match self {
            TensorFile::Safetensors(f) => f.get(name),
            TensorFile::Gguf(g) => g.get(name),
        }
    }

    /// The safetensors `__metadata__` (none for a GGUF model).
    pub fn metadata(&self) -> &[(String, String)] {
        match self {
            TensorFile::Safetensors(f) => f.metadata(),
            TensorFile::Gguf(_) => &[],
        }
    }

    pub fn as_gguf(&self) -> Option<&GgufSource> {
        match self {
            TensorFile::Gguf(g) => Some(g),
            TensorFile::Safetensors(_) => None,
        }
    }

    /// Bytes the tensor takes in this file (GGUF blocks are smaller than the floats they decode to).
    pub fn stored_bytes(&self, t: &TensorInfo) -> usize {
        match self {
            TensorFile::Safetensors(_) => t.nbytes(),
            TensorFile::Gguf(g) => g.stored_bytes(t),
        }
    }

    /// How the tensor is stored: the safetensors dtype, or the ggml type of a GGUF tensor.
    pub fn stored_type(&self, t: &TensorInfo) -> &'static str {
        match self {
            TensorFile::Safetensors(_) => t.dtype.name(),
            TensorFile::Gguf(g) => g.stored(t).ggml_type.name,
        }
    }

    /// The elements of a float tensor: viewed in place, or decoded.
    pub(crate) fn floats(&self, t: &TensorInfo, dtype: DType) -> Result<Floats<'_>> {
        match self {
            TensorFile::Safetensors(f) => Ok(Floats::new(f.data(t), dtype)),
            TensorFile::Gguf(g) => {
                let n = t.numel();
                Ok(match dtype {
                    DType::F32 => {
                        let mut v = vec![0f32; n];
                        g.decode(t, 0, FloatSliceMut::F32(&mut v))?;
                        Floats::F32(v)
                    }
                    DType::F16 => {
                        let mut v = vec![half::f16::ZERO; n];
                        g.decode(t, 0, FloatSliceMut::F16(&mut v))?;
                        Floats::F16(v)
                    }
                    DType::BF16 => {
                        let mut v = vec![half::bf16::ZERO; n];
                        g.decode(t, 0, FloatSliceMut::BF16(&mut v))?;
                        Floats::BF16(v)
                    }
                })
            }
        }
    }

    /// Bytes `at..at + len` of the tensor as it is written to a safetensors file.
    pub fn bytes(&self, t: &TensorInfo, at: usize, len: usize) -> Result<Cow<'_, [u8]>> {
        match self {
            TensorFile::Safetensors(f) => Ok(Cow::Borrowed(f.data_range(t.begin + at, t.begin + at + len))),
            TensorFile::Gguf(g) => Ok(Cow::Owned(g.decode_bytes(t, at, len)?)),
        }
    }

    /// Asks the kernel to read ahead as many bytes as `first..=last` span, after `last`.
    pub fn prefetch_after(&self, first: &TensorInfo, last: &TensorInfo) {
        match self {
            TensorFile::Safetensors(f) => {
                let data_len = f.tensors().last().map_or(0, |t| t.end);
                let (b, e) = (first.begin, last.end);
                f.prefetch(e, (e + e.saturating_sub(b)).min(data_len));
            }
            TensorFile::Gguf(g) => {
                let span = last.end.saturating_sub(first.begin);
                for t in g.tensors().iter().filter(|t| t.begin >= last.end && t.begin < last.end + span) {
                    g.prefetch(t);
                }
            }
        }
    }

    /// Drops the pages of a tensor from the resident set.
    pub fn release(&self, t: &TensorInfo) {
        self.release_range(t, 0, t.nbytes());
    }

    /// Drops the pages behind bytes `at..at + len` of a tensor (all of a GGUF tensor's pages once
    /// the range reaches its end).
    pub fn release_range(&self, t: &TensorInfo, at: usize, len: usize) {
        match self {
            TensorFile::Safetensors(f) => f.release(t.begin + at, t.begin + at + len),
            TensorFile::Gguf(g) => {
                if at + len >= t.nbytes() {
                    g.release(t);
                }
            }
        }
    }
}
