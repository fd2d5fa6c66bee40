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
            quantize_chunk_dispatch(xs, ps, ams, encoder, blocksize, allow_nonfinite).map(|(i, v)| (c * chunk + i, v))
        })
        .filter_map(|r| r)
        .min_by_key(|(i, _)| *i);
    match first_bad {
        Some((index, value)) => Err(Error::NonFinite { what: "input".into(), index, value }),
        None => Ok(()),
    }
}

/// Quantizes consecutive blocks with the widest vector instructions this CPU has (the loops are
/// written for auto-vectorisation; AVX2 doubles their width over the baseline SSE2).
fn quantize_chunk_dispatch<T: Element>(
    xs: &[T],
    ps: &mut [u8],
    ams: &mut [f32],
    encoder: &Encoder4,
    blocksize: usize,
    allow_nonfinite: bool,
) -> Option<(usize, f32)> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { quantize_chunk_avx2(xs, ps, ams, encoder, blocksize, allow_nonfinite) };
    }
    quantize_chunk(xs, ps, ams, encoder, blocksize, allow_nonfinite)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_chunk_avx2<T: Element>(
    xs: &[T],
    ps: &mut [u8],
    ams: &mut [f32],
    encoder: &Encoder4,
    blocksize: usize,
    allow_nonfinite: bool,
) -> Option<(usize, f32)> {
    quantize_chunk(xs, ps, ams, encoder, blocksize, allow_nonfinite)
}

/// Quantizes the blocks of one chunk; returns the first non-finite (index in chunk, value).
#[inline(always)]
fn quantize_chunk<T: Element>(
    xs: &[T],
    ps: &mut [u8],
    ams: &mut [f32],
    encoder: &Encoder4,
    blocksize: usize,
    allow_nonfinite: bool,
) -> Option<(usize, f32)> {
    for (b, ((xb, pb), am)) in xs.chunks(blocksize).zip(ps.chunks_mut(blocksize / 2)).zip(ams.iter_mut()).enumerate() {
        let full = xb.len() == blocksize;
        match quantize_block(xb, encoder, full, allow_nonfinite, pb) {
            Ok(a) => *am = a,
            Err((i, v)) => return Some((b * blocksize + i, v)),
        }
    }
    None
}

/// Elements scaled and encoded together: enough for the compiler to vectorise the comparisons.
const LANE_CHUNK: usize = 64;

/// Quantizes one block; returns the absmax to store, or the first non-finite (index, value).
#[inline(always)]
fn quantize_block<T: Element>(
    xb: &[T],
    encoder: &Encoder4,
    full: bool,
    allow_nonfinite: bool,
    out: &mut [u8],
) -> std::result::Result<f32, (usize, f32)> {
    // Pass 1: absmax and finiteness in one integer max: for non-negative floats the bit patterns
    // order like the values, and every NaN or infinity lies above the largest finite pattern.
    let mut amax_bits = 0u32;
    for v in xb {
        amax_bits = amax_bits.max(v.to_f32().to_bits() & 0x7fff_ffff);
    }
    let finite = amax_bits < f32::INFINITY.to_bits();
    let mut amax = f32::from_bits(amax_bits);
    if !finite {
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
    let mids = &encoder.midpoints;
    // Rank = number of midpoints below the scaled value; the 15 comparisons unroll and the loop
    // over elements vectorises.
    let rank_of = |x: f32| -> u32 {
        let mut count = 0u32;
        for &m in mids {
            count += (x > m) as u32;
        }
        count
    };
    let mut rank = [0u32; LANE_CHUNK];
    for (xc, oc) in xb.chunks(LANE_CHUNK).zip(out.chunks_mut(LANE_CHUNK / 2)) {
        let len = xc.len();
        if full && finite {
            for (r, v) in rank.iter_mut().zip(xc) {
                *r = rank_of((v.to_f32() * reciprocal).max(-1.0).min(1.0));
            }
        } else {
            for (r, v) in rank.iter_mut().zip(xc) {
                let mut f = v.to_f32();
                if !finite {
                    // allow_nonfinite: NaN encodes as 0, +-inf saturates.
                    f = if f.is_nan() { 0.0 } else { f.clamp(-divisor, divisor) };
                }
                let x = if full { f * reciprocal } else { f / divisor };
                *r = rank_of(x.max(-1.0).min(1.0));
            }
        }
        // An odd tail pads with 0.0, which is what the last low nibble must encode.
        if len % 2 == 1 {
            rank[len] = rank_of(0.0);
        }
        let used = &mut rank[..len + len % 2];
        if !encoder.is_sorted {
            for r in used.iter_mut() {
                *r = encoder.nibble_of_rank[*r as usize] as u32;
            }
        }
        for (o, pair) in oc.iter_mut().zip(used.chunks_exact(2)) {
            *o = ((pair[0] << 4) | pair[1]) as u8;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn quantize(x: &[f32], qt: QuantType, bs: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut packed = vec![0u8; packed_len(x.len())];
        let mut absmax = vec![0f32; num_blocks(x.len(), bs)];
        quantize_4bit(FloatSlice::F32(x), qt, bs, false, &mut packed, &mut absmax)?;
        Ok((packed, absmax))
    }

    #[test]
    fn codes_round_trip_exactly() {
        // Each code value times a power of two survives quantize -> dequantize unchanged.
        for qt in [QuantType::Nf4, QuantType::Fp4, QuantType::Int4] {
            let x: Vec<f32> = (0..64).map(|i| qt.code()[i % 16] * 4.0).collect();
            let (packed, absmax) = quantize(&x, qt, 64).unwrap();
            assert_eq!(absmax, vec![4.0]);
            let mut out = vec![0f32; 64];
            dequantize_4bit(&packed, &absmax, qt, 64, FloatSliceMut::F32(&mut out)).unwrap();
            assert_eq!(out.iter().map(|v| v.abs()).collect::<Vec<_>>(), x.iter().map(|v| v.abs()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn high_nibble_first_and_odd_padding() {
        let x = [1.0f32, -1.0, 0.0];
        let (packed, _) = quantize(&x, QuantType::Nf4, 32).unwrap();
        assert_eq!(packed, vec![0xF0, 0x77]);
    }

    #[test]
    fn exact_midpoint_goes_to_lower_code() {
        let m = NF4_ENCODER.midpoints[10];
        assert_eq!(NF4_ENCODER.encode(m), 10);
        assert_eq!(NF4_ENCODER.encode(f32::from_bits(m.to_bits() + 1)), 11);
    }

    #[test]
    fn zero_blocks_do_not_produce_nan() {
        let x = vec![0f32; 100];
        let (packed, absmax) = quantize(&x, QuantType::Nf4, 64).unwrap();
        assert!(packed.iter().all(|&b| b == 0x77));
        assert_eq!(absmax, vec![0.0, MIN_ABSMAX]);
        let mut out = vec![f32::NAN; 100];
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, 64, FloatSliceMut::F32(&mut out)).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn nonfinite_reports_first_index_across_chunks() {
        let mut x = vec![0.5f32; 3 * CHUNK_ELEMENTS];
        x[2 * CHUNK_ELEMENTS + 5] = f32::INFINITY;
        x[CHUNK_ELEMENTS + 7] = f32::NAN;
        match quantize(&x, QuantType::Nf4, 64) {
            Err(Error::NonFinite { index, .. }) => assert_eq!(index, CHUNK_ELEMENTS + 7),
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_blocksize_lists_the_supported_ones() {
        let err = quantize(&[1.0; 10], QuantType::Nf4, 48).unwrap_err().to_string();
        assert!(err.contains("48") && err.contains("32, 64, 128, 256, 512, 1024, 2048, 4096"), "{err}");
    }

    #[test]
    fn buffer_size_mismatch_is_an_error() {
        let mut packed = vec![0u8; 3];
        let mut absmax = vec![0f32; 1];
        let err = quantize_4bit(FloatSlice::F32(&[1.0; 10]), QuantType::Nf4, 64, false, &mut packed, &mut absmax);
        assert!(matches!(err, Err(Error::Shape(_))));
    }

    #[test]
    fn bf16_output_rounds_once() {
        let x: Vec<bf16> = (0..64).map(|i| bf16::from_f32(i as f32 / 7.0 - 4.0)).collect();
        let mut packed = vec![0u8; 32];
        let mut absmax = vec![0f32; 1];
        quantize_4bit(FloatSlice::BF16(&x), QuantType::Nf4, 64, false, &mut packed, &mut absmax).unwrap();
        let mut out = vec![bf16::ZERO; 64];
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, 64, FloatSliceMut::BF16(&mut out)).unwrap();
        for (i, o) in out.iter().enumerate() {
            let nib = if i % 2 == 0 { packed[i / 2] >> 4 } else { packed[i / 2] & 15 };
            assert_eq!(*o, bf16::from_f32(NF4_CODE[nib as usize] * absmax[0]));
        }
    }
}
