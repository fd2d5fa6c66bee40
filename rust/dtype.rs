//! The float element types the core reads and writes: float32, float16, bfloat16.

use half::{bf16, f16};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const NAMES: &'static str = "\"float32\", \"float16\", \"bfloat16\"";

    /// Accepts the names used by torch (`float32`, `bfloat16`, ...), safetensors (`F32`, `BF16`, ...)
    /// and bitsandbytes' quant-state JSON (`bfloat16`, `torch.bfloat16`).
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().trim_start_matches("torch.").to_ascii_lowercase();
        match n.as_str() {
            "float32" | "f32" | "float" | "fp32" => Ok(DType::F32),
            "float16" | "f16" | "half" | "fp16" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            _ => Err(Error::unsupported(format!(
                "unsupported dtype {name:?}: expected one of {}",
                Self::NAMES
            ))),
        }
    }

    /// The name torch and bitsandbytes' quant-state JSON use.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// The safetensors dtype tag.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A float element the core can quantize from and dequantize to.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Round to nearest even, as torch's `.to(dtype)` does.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    /// Exact (bf16 is the top half of a float32); written out so that it vectorises.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A borrowed input buffer of one of the supported float types.
#[derive(Clone, Copy, Debug)]
pub enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> FloatSlice<'a> {
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(s) => s.len(),
            FloatSlice::F16(s) => s.len(),
            FloatSlice::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            FloatSlice::F32(_) => DType::F32,
            FloatSlice::F16(_) => DType::F16,
            FloatSlice::BF16(_) => DType::BF16,
        }
    }

    /// Views raw little-endian bytes (e.g. a memory-mapped safetensors tensor) as elements.
    /// Fails if the bytes are not aligned for the element type or not a whole number of elements.
    pub fn from_bytes(bytes: &'a [u8], dtype: DType) -> Result<Self> {
        fn cast<T: bytemuck::Pod>(bytes: &[u8], dtype: DType) -> Result<&[T]> {
            bytemuck::try_cast_slice(bytes).map_err(|e| {
                Error::shape(format!("{} bytes cannot be viewed as {}: {e:?}", bytes.len(), dtype.name()))
            })
        }
        Ok(match dtype {
            DType::F32 => FloatSlice::F32(cast(bytes, dtype)?),
            DType::F16 => FloatSlice::F16(cast(bytes, dtype)?),
            DType::BF16 => FloatSlice::BF16(cast(bytes, dtype)?),
        })
    }
}

/// A borrowed output buffer of one of the supported float types.
#[derive(Debug)]
pub enum FloatSliceMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl<'a> FloatSliceMut<'a> {
    pub fn len(&self) -> usize {
        match self {
            FloatSliceMut::F32(s) => s.len(),
            FloatSliceMut::F16(s) => s.len(),
            FloatSliceMut::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            FloatSliceMut::F32(_) => DType::F32,
            FloatSliceMut::F16(_) => DType::F16,
            FloatSliceMut::BF16(_) => DType::BF16,
        }
    }
}
