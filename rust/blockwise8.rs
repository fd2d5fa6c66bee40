//! Blockwise 8-bit quantization with a 256-entry map (bitsandbytes' `quantize_blockwise`), and
//! the double quantization of 4-bit block scales built on it.
//!
//! The 8-bit quantizer is public on its own: the paged 8-bit optimizer stores its states with it.

use rayon::prelude::*;

use crate::codebook::{dynamic_map, Encoder8};
use crate::error::{Error, Result};
use crate::reduce::{torch_mean_f32, SumOrder};

/// Block size of the nested (second-level) quantization of 4-bit absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The signed dynamic map ([-1, 1]; entry 0 is -0.99297), the nested quant map stored with
/// double-quantized 4-bit tensors.
pub fn signed_dynamic_map() -> [f32; 256] {
    dynamic_map(true)
}

/// The unsigned dynamic map ([0, 1]), for non-negative optimizer states.
pub fn unsigned_dynamic_map() -> [f32; 256] {
    dynamic_map(false)
}

const CHUNK_BLOCKS: usize = 64;

/// Quantizes `input` blockwise to 8-bit indices into `map`, storing one f32 absmax per block,
/// byte for byte as bitsandbytes' CPU `quantize_blockwise` (0.50): each value is multiplied by
/// the float32 reciprocal of its block's absmax and encoded by [`Encoder8`] (a 65536-point grid,
/// not the nearest entry). A block whose absmax is 0 stores code 0, as bitsandbytes does; it
/// decodes to (signed) zero whatever the map holds at index 0.
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
    let encoder = &Encoder8::new(map);
    let chunk = blocksize * CHUNK_BLOCKS;
    input
        .par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .zip(absmax.par_chunks_mut(CHUNK_BLOCKS))
        .for_each(|((xs, os), ams)| {
            for ((xb, ob), am) in xs.chunks(blocksize).zip(os.chunks_mut(blocksize)).zip(ams.iter_mut()) {
                let a = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                *am = a;
                if a == 0.0 {
                    ob.fill(0);
                    continue;
                }
                // A subnormal absmax makes the reciprocal infinite; 0 * inf = NaN then encodes
                // as code 0, exactly as in bitsandbytes.
                let inv = 1.0 / a;
                for (o, &v) in ob.iter_mut().zip(xb) {
                    *o = encoder.encode(v * inv);
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

/// Double quantization of 4-bit block scales: `offset = mean(absmax)` (float32, summed in
/// PyTorch's order so the offset equals bitsandbytes'), then `absmax - offset` quantized blockwise
/// (256) with the signed dynamic map. Writes `quantized` (one byte per absmax) and `nested_absmax`
/// (one float per 256), returns the offset.
pub fn double_quantize(absmax: &[f32], quantized: &mut [u8], nested_absmax: &mut [f32]) -> Result<f32> {
    double_quantize_with(absmax, SumOrder::detect(), quantized, nested_absmax)
}

/// [`double_quantize`] with an explicit summation order for the mean.
pub fn double_quantize_with(
    absmax: &[f32],
    order: SumOrder,
    quantized: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<f32> {
    let offset = torch_mean_f32(absmax, order);
    double_quantize_with_offset(absmax, offset, quantized, nested_absmax)?;
    Ok(offset)
}

/// [`double_quantize`] around a given offset: callers with torch at hand pass `absmax.mean()` as
/// torch computes it, which is bitsandbytes' offset on every CPU by construction.
pub fn double_quantize_with_offset(
    absmax: &[f32],
    offset: f32,
    quantized: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<()> {
    if !offset.is_finite() {
        return Err(Error::unsupported(format!(
            "double quantization: the offset (mean of the block scales) is {offset}; it must be finite \
             (block scales this large overflow a float32 sum: quantize without double quantization)"
        )));
    }
    let centered: Vec<f32> = absmax.par_iter().map(|&a| a - offset).collect();
    quantize_blockwise_8bit(&centered, &signed_dynamic_map(), NESTED_BLOCKSIZE, quantized, nested_absmax)
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
