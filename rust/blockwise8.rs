//! Blockwise 8-bit quantization with a 256-entry map (bitsandbytes' `quantize_blockwise`), and
//! the double quantization of 4-bit block scales built on it.
//!
//! The 8-bit quantizer is public on its own: the paged 8-bit optimizer stores its states with it.

use rayon::prelude::*;

use crate::codebook::{dynamic_map, encode_8bit};
use crate::error::{Error, Result};

/// Block size of the nested (second-level) quantization of 4-bit absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The signed dynamic map ([-1, 1]; entry 0 is -0.99297), the nested quant map stored with
/// double-quantized 4-bit tensors.
pub fn signed_dynamic_map() -> [f32; 256] {
    dynamic_map(true)
}

/// The map the encoder searches: bitsandbytes' CPU quantizer widens entry 0 to -1.0 so that a
/// normalised -1.0 stays inside the searched range.
fn search_map(map: &[f32; 256]) -> [f32; 256] {
    let mut m = *map;
    if m[0] < 0.0 {
        m[0] = -1.0;
    }
    m
}

/// The unsigned dynamic map ([0, 1]), for non-negative optimizer states.
pub fn unsigned_dynamic_map() -> [f32; 256] {
    dynamic_map(false)
}

const CHUNK_BLOCKS: usize = 64;

/// Quantizes `input` blockwise to 8-bit indices into `map` (sorted ascending), storing one f32
/// absmax per block. A block whose absmax is 0 encodes as the index nearest 0.0.
pub fn quantize_blockwise_8bit(
    input: &[f32],
    map: &[f32; 256],
    blocksize: usize,
    out: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check(input.len(), blocksize, out.len(), absmax.len())?;
    if let Some(i) = input.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "input".into(), index: i, value: input[i] });
    }
    let map = &search_map(map);
    let chunk = blocksize * CHUNK_BLOCKS;
    input
        .par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .zip(absmax.par_chunks_mut(CHUNK_BLOCKS))
        .for_each(|((xs, os), ams)| {
            for ((xb, ob), am) in xs.chunks(blocksize).zip(os.chunks_mut(blocksize)).zip(ams.iter_mut()) {
                let a = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                *am = a;
                for (o, &v) in ob.iter_mut().zip(xb) {
                    // bitsandbytes divides (no reciprocal) and does not clamp here.
                    let normed = if a > 0.0 { v / a } else { 0.0 };
                    *o = encode_8bit(map, normed);
                }
            }
        });
    Ok(())
}

/// Inverse of [`quantize_blockwise_8bit`]: `map[q] * absmax[block]` in float32.
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    map: &[f32; 256],
    blocksize: usize,
    out: &mut [f32],
) -> Result<()> {
    if q.len() != out.len() {
        return Err(Error::shape(format!("{} codes but an output of {} elements", q.len(), out.len())));
    }
    check(q.len(), blocksize, q.len(), absmax.len())?;
    let chunk = blocksize * CHUNK_BLOCKS;
    out.par_chunks_mut(chunk).zip(q.par_chunks(chunk)).zip(absmax.par_chunks(CHUNK_BLOCKS)).for_each(
        |((os, qs), ams)| {
            for ((ob, qb), &a) in os.chunks_mut(blocksize).zip(qs.chunks(blocksize)).zip(ams) {
                for (o, &c) in ob.iter_mut().zip(qb) {
                    *o = map[c as usize] * a;
                }
            }
        },
    );
    Ok(())
}

fn check(n: usize, blocksize: usize, out: usize, absmax: usize) -> Result<()> {
    if blocksize == 0 {
        return Err(Error::unsupported("blocksize must be positive"));
    }
    if out != n {
        return Err(Error::shape(format!("{n} inputs but an output of {out} codes")));
    }
    if absmax != n.div_ceil(blocksize) {
        return Err(Error::shape(format!(
            "absmax has {absmax} entries; {n} elements in blocks of {blocksize} need {}",
            n.div_ceil(blocksize)
        )));
    }
    Ok(())
}

/// Number of nested absmax values for `blocks` first-level blocks.
pub fn nested_blocks(blocks: usize) -> usize {
    blocks.div_ceil(NESTED_BLOCKSIZE)
}

/// Mean of float32 values rounded to float32: the offset double quantization subtracts.
/// (Summed in float64, so the result does not depend on thread count or SIMD width.)
pub fn mean_f32(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let sum: f64 = values.par_iter().map(|&v| v as f64).sum();
    (sum as f32) / (values.len() as f32)
}

/// Double quantization of 4-bit block scales: `offset = mean(absmax)`, then `absmax - offset`
/// quantized blockwise (256) with the signed dynamic map. Writes `quantized` (one byte per absmax)
/// and `nested_absmax` (one float per 256), returns the offset.
pub fn double_quantize(absmax: &[f32], quantized: &mut [u8], nested_absmax: &mut [f32]) -> Result<f32> {
    let offset = mean_f32(absmax);
    let centered: Vec<f32> = absmax.par_iter().map(|&a| a - offset).collect();
    quantize_blockwise_8bit(&centered, &signed_dynamic_map(), NESTED_BLOCKSIZE, quantized, nested_absmax)?;
    Ok(offset)
}

/// Inverse of [`double_quantize`]: `map[q] * nested_absmax + offset`, two float32 roundings
/// (no fused multiply-add), as bitsandbytes computes it.
pub fn double_dequantize(
    quantized: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    map: &[f32; 256],
    out: &mut [f32],
) -> Result<()> {
    dequantize_blockwise_8bit(quantized, nested_absmax, map, NESTED_BLOCKSIZE, out)?;
    out.par_iter_mut().for_each(|v| *v += offset);
    Ok(())
}
