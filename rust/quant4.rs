//! Blockwise 4-bit quantization (NF4, FP4, INT4), bit-compatible with bitsandbytes.
//!
//! Layout: the input is read as a flat row-major vector of n elements and cut into blocks of
//! `blocksize` consecutive elements (blocks run across row boundaries; the last may be partial).
//! Each block stores its absolute maximum as float32; each element stores the nibble of the code
//! nearest to `x / absmax`. Element 2j goes to the high nibble of byte j, element 2j+1 to the low
//! nibble; for odd n the last low nibble encodes 0.0.

use rayon::prelude::*;

use crate::codebook::{Encoder4, FP4_CODE, FP4_ENCODER, INT4_CODE, INT4_ENCODER, NF4_CODE, NF4_ENCODER};
use crate::dtype::{Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};

/// Block sizes bitsandbytes supports for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Smallest absmax used as a divisor (bitsandbytes clamps to this so an all-zero block gives 0, not NaN).
pub const MIN_ABSMAX: f32 = 1e-38;

/// Elements one rayon task quantizes or dequantizes: large enough to amortise scheduling,
/// small enough to balance two to a few dozen cores.
const CHUNK_ELEMENTS: usize = 1 << 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    Nf4,
    Fp4,
    Int4,
}

impl QuantType {
    pub const NAMES: &'static str = "\"nf4\", \"fp4\", \"int4\"";

    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            "int4" => Ok(QuantType::Int4),
            _ => Err(Error::unsupported(format!(
                "unsupported quant_type {name:?}: expected one of {}",
                Self::NAMES
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int4 => "int4",
        }
    }

    /// The 16 decode values, index = nibble.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
            QuantType::Int4 => &INT4_CODE,
        }
    }

    pub fn encoder(self) -> &'static Encoder4 {
        match self {
            QuantType::Nf4 => &NF4_ENCODER,
            QuantType::Fp4 => &FP4_ENCODER,
            QuantType::Int4 => &INT4_ENCODER,
        }
    }
}

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::unsupported(format!(
            "unsupported blocksize {blocksize}: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096"
        )))
    }
}

/// Number of blocks (= absmax entries) for n elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Number of packed bytes for n elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

fn check_buffers(n: usize, blocksize: usize, packed: usize, absmax: usize) -> Result<()> {
    check_blocksize(blocksize)?;
    if packed != packed_len(n) {
        return Err(Error::shape(format!(
            "packed buffer has {packed} bytes; {n} elements need {}",
            packed_len(n)
        )));
    }
    if absmax != num_blocks(n, blocksize) {
        return Err(Error::shape(format!(
            "absmax has {absmax} entries; {n} elements in blocks of {blocksize} need {}",
            num_blocks(n, blocksize)
        )));
    }
    Ok(())
}

/// Quantizes `input` into `packed` (`(n+1)/2` bytes) and `absmax` (`ceil(n/blocksize)` floats).
///
/// Non-finite input is an error naming the first bad index unless `allow_nonfinite` is set; then
/// NaN encodes as 0 and +-inf saturates to the block's largest finite magnitude.
pub fn quantize_4bit(
    input: FloatSlice<'_>,
    quant_type: QuantType,
    blocksize: usize,
    allow_nonfinite: bool,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_buffers(input.len(), blocksize, packed.len(), absmax.len())?;
    match input {
        FloatSlice::F32(x) => quantize_typed(x, quant_type, blocksize, allow_nonfinite, packed, absmax),
        FloatSlice::F16(x) => quantize_typed(x, quant_type, blocksize, allow_nonfinite, packed, absmax),
        FloatSlice::BF16(x) => quantize_typed(x, quant_type, blocksize, allow_nonfinite, packed, absmax),
    }
}

fn chunk_elements(blocksize: usize) -> usize {
    CHUNK_ELEMENTS.max(blocksize)
}

fn quantize_typed<T: Element>(
    x: &[T],
    quant_type: QuantType,
    blocksize: usize,
    allow_nonfinite: bool,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let encoder = quant_type.encoder();
    let chunk = chunk_elements(blocksize);
    let first_bad = x
        .par_chunks(chunk)
        .zip(packed.par_chunks_mut(chunk / 2))
        .zip(absmax.par_chunks_mut(chunk / blocksize))
        .enumerate()
        .map(|(c, ((xs, ps), ams))| {
            let base = c * chunk;
            let mut first_bad: Option<(usize, f32)> = None;
            for (b, ((xb, pb), am)) in
                xs.chunks(blocksize).zip(ps.chunks_mut(blocksize / 2)).zip(ams.iter_mut()).enumerate()
            {
                let full = xb.len() == blocksize;
                match quantize_block(xb, encoder, full, allow_nonfinite, pb) {
                    Ok(a) => *am = a,
                    Err((i, v)) => {
                        first_bad = Some((base + b * blocksize + i, v));
                        break;
                    }
                }
            }
            first_bad
        })
        .filter_map(|r| r)
        .min_by_key(|(i, _)| *i);
    match first_bad {
        Some((index, value)) => Err(Error::NonFinite { what: "input".into(), index, value }),
        None => Ok(()),
    }
}

/// Quantizes one block; returns the absmax to store, or the first non-finite (index, value).
#[inline]
fn quantize_block<T: Element>(
    xb: &[T],
    encoder: &Encoder4,
    full: bool,
    allow_nonfinite: bool,
    out: &mut [u8],
) -> std::result::Result<f32, (usize, f32)> {
    let mut amax = 0f32;
    let mut finite = true;
    for v in xb {
        let f = v.to_f32();
        finite &= f.is_finite();
        amax = amax.max(f.abs());
    }
    let sanitize = !finite;
    if sanitize {
        if !allow_nonfinite {
            let i = xb.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
            return Err((i, xb[i].to_f32()));
        }
        amax = xb.iter().map(|v| v.to_f32()).filter(|f| f.is_finite()).fold(0f32, |a, f| a.max(f.abs()));
    }
    let divisor = amax.max(MIN_ABSMAX);
    // bitsandbytes multiplies full blocks by a float32 reciprocal and divides the partial last
    // block; both are reproduced so the codes match bit for bit.
    let reciprocal = 1.0f32 / divisor;
    let scale = |v: T| -> f32 {
        let mut f = v.to_f32();
        if sanitize {
            if f.is_nan() {
                f = 0.0;
            } else if f.is_infinite() {
                f = f.signum() * divisor;
            }
        }
        let s = if full { f * reciprocal } else { f / divisor };
        s.clamp(-1.0, 1.0)
    };
    let mut pairs = xb.chunks_exact(2);
    for (o, p) in out.iter_mut().zip(&mut pairs) {
        *o = (encoder.encode(scale(p[0])) << 4) | encoder.encode(scale(p[1]));
    }
    if let [last] = pairs.remainder() {
        out[xb.len() / 2] = (encoder.encode(scale(*last)) << 4) | encoder.encode(0.0);
    }
    Ok(if full { amax } else { divisor })
}

/// Dequantizes `packed`/`absmax` into `out` (its length is the element count n).
/// Each value is `code[nibble] * absmax` in float32, rounded once to the output type.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    out: FloatSliceMut<'_>,
) -> Result<()> {
    check_buffers(out.len(), blocksize, packed.len(), absmax.len())?;
    match out {
        FloatSliceMut::F32(o) => dequantize_typed(packed, absmax, quant_type, blocksize, o),
        FloatSliceMut::F16(o) => dequantize_typed(packed, absmax, quant_type, blocksize, o),
        FloatSliceMut::BF16(o) => dequantize_typed(packed, absmax, quant_type, blocksize, o),
    }
    Ok(())
}

fn dequantize_typed<T: Element>(packed: &[u8], absmax: &[f32], quant_type: QuantType, blocksize: usize, out: &mut [T]) {
    let code = quant_type.code();
    let chunk = chunk_elements(blocksize);
    out.par_chunks_mut(chunk)
        .zip(packed.par_chunks(chunk / 2))
        .zip(absmax.par_chunks(chunk / blocksize))
        .for_each(|((os, ps), ams)| {
            for ((ob, pb), &am) in os.chunks_mut(blocksize).zip(ps.chunks(blocksize / 2)).zip(ams) {
                let mut lut = [T::from_f32(0.0); 16];
                for (l, c) in lut.iter_mut().zip(code) {
                    *l = T::from_f32(c * am);
                }
                let mut pairs = ob.chunks_exact_mut(2);
                for (o, &byte) in (&mut pairs).zip(pb) {
                    o[0] = lut[(byte >> 4) as usize];
                    o[1] = lut[(byte & 0x0f) as usize];
                }
                if let [last] = pairs.into_remainder() {
                    *last = lut[(pb[pb.len() - 1] >> 4) as usize];
                }
            }
        });
}
