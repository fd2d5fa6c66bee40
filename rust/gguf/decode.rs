//! Block decoders: GGUF tensor bytes to floats, bit for bit what the gguf package's
//! `gguf.quants.dequantize` computes in float32 (the same operations in the same order, and no
//! fused multiply-add), then rounded to the requested element type as torch's `.to(dtype)` does.
//!
//! Layouts (ggml-common.h); `d`, `m`, `dmin` are float16 scales, `q` the quants of a block:
//! - Q4_0 [d, 16 bytes of nibbles]: element j < 16 is the low nibble of byte j, j >= 16 the high
//!   nibble of byte j - 16; x = d * (q - 8). Q4_1 adds `m` after `d`: x = d * q + m.
//! - Q5_0 [d, u32 of fifth bits, nibbles as Q4_0]: q = nibble | bit j << 4; x = d * (q - 16).
//!   Q5_1 [d, m, bits, nibbles]: x = d * q + m.
//! - Q8_0 [d, 32 x i8]: x = q * d.
//! - K-quants: super-blocks of 256 elements in sub-blocks with 6-bit (Q4_K, Q5_K), 4-bit (Q2_K),
//!   6-bit signed (Q3_K) or 8-bit signed (Q6_K) scales, decoded in the functions below.

use rayon::prelude::*;

use super::ggml_type::{self, GgmlType};
use crate::dtype::Element;

/// Elements of the largest block (the K-quants' super-block).
const MAX_BLOCK: usize = 256;

/// Elements decoded per parallel task (whole rows are grouped up to about this many).
const TASK_ELEMENTS: usize = 1 << 16;

#[inline(always)]
fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        out[j] = d * ((q & 0xF) as i32 - 8) as f32;
        out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        out[j] = d * (q & 0xF) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let lo = (q & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = d * (lo as i32 - 16) as f32;
        out[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let lo = (q & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = d * lo as f32 + m;
        out[j + 16] = d * hi as f32 + m;
    }
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16(b, 0);
    for j in 0..32 {
        out[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K [16 scale bytes (low nibble: scale, high: min), 64 bytes of 2-bit quants, d, dmin].
/// Element e = 128 h + 32 s + j is bits 2s..2s+2 of quant byte 32 h + j; group e / 16.
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    let qs = &b[16..80];
    for (g, &scale) in b[..16].iter().enumerate() {
        let dl = d * (scale & 0xF) as f32;
        let ml = dmin * (scale >> 4) as f32;
        for i in 0..16 {
            let e = g * 16 + i;
            let (h, s, j) = (e / 128, (e % 128) / 32, e % 32);
            let q = (qs[32 * h + j] >> (2 * s)) & 3;
            out[e] = dl * q as f32 - ml;
        }
    }
}

/// Q3_K [32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales, d]. Element
/// e = 128 h + 32 s + j: low bits as Q2_K, high bit e / 32 of byte j (set means no -4 offset).
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(b, 108);
    for g in 0..16 {
        let low = if g < 8 { scales[g] & 0xF } else { scales[g - 8] >> 4 };
        let high = (scales[8 + g % 4] >> (2 * (g / 4))) & 3;
        let dl = d * (((low | high << 4) as i8) as i32 - 32) as f32;
        for i in 0..16 {
            let e = g * 16 + i;
            let (h, s, j) = (e / 128, (e % 128) / 32, e % 32);
            let ql = ((qs[32 * h + j] >> (2 * s)) & 3) as i32;
            let borrow = (((hmask[j] >> (e / 32)) & 1) ^ 1) as i32;
            out[e] = dl * (ql - (borrow << 2)) as f32;
        }
    }
}

/// The eight 6-bit (scale, min) pairs of Q4_K and Q5_K, packed in 12 bytes.
fn k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Q4_K [d, dmin, 12 scale bytes, 128 bytes of nibbles]: sub-block k = 2c + s of 32 elements takes
/// nibble s of bytes 32c..32c+32.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (sc, mn) = k_scales(&b[4..16]);
    let qs = &b[16..144];
    for k in 0..8 {
        let dk = d * sc[k] as f32;
        let mk = dmin * mn[k] as f32;
        let (c, s) = (k / 2, k % 2);
        for j in 0..32 {
            let q = (qs[32 * c + j] >> (4 * s)) & 0xF;
            out[32 * k + j] = dk * q as f32 - mk;
        }
    }
}

/// Q5_K [d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of nibbles]: as Q4_K, plus bit
/// k of byte j as the fifth bit of element j of sub-block k.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (sc, mn) = k_scales(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for k in 0..8 {
        let dk = d * sc[k] as f32;
        let mk = dmin * mn[k] as f32;
        let (c, s) = (k / 2, k % 2);
        for j in 0..32 {
            let q = ((qs[32 * c + j] >> (4 * s)) & 0xF) | (((qh[j] >> k) & 1) << 4);
            out[32 * k + j] = dk * q as f32 - mk;
        }
    }
}

/// Q6_K [128 bytes of low nibbles, 64 bytes of high bit pairs, 16 i8 scales, d]. Element
/// e = 128 h + r: low nibble (r / 64) of byte 64 h + r % 64, high pair (r / 32) of byte 32 h + r % 32.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(b, 208);
    for (g, &scale) in scales.iter().enumerate() {
        let dg = d * (scale as i8) as f32;
        for i in 0..16 {
            let e = g * 16 + i;
            let (h, r) = (e / 128, e % 128);
            let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
            let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            out[e] = dg * (((lo | hi << 4) as i8) as i32 - 32) as f32;
        }
    }
}

type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty.id {
        2 => q4_0,
        3 => q4_1,
        6 => q5_0,
        7 => q5_1,
        8 => q8_0,
        10 => q2_k,
        11 => q3_k,
        12 => q4_k,
        13 => q5_k,
        14 => q6_k,
        _ => return None,
    })
}

/// Decodes `src`, whole blocks of `ty`, into `out` (one element per decoded value).
///
/// Panics if `ty` is not decodable or the lengths do not agree; callers check both when the
/// header is read.
pub fn decode<T: Element>(ty: GgmlType, src: &[u8], out: &mut [T]) {
    assert!(ty.decodable, "ggml type {} has no decoder", ty.name);
    assert_eq!(src.len() / ty.block_bytes * ty.block_len, out.len(), "{} bytes of {} for {} elements", src.len(), ty.name, out.len());
    assert_eq!(src.len() % ty.block_bytes, 0);
    if ty == ggml_type::F32 {
        for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
            *o = T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    } else if ty == ggml_type::F16 {
        for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
            *o = T::from_f32(f16(c, 0));
        }
    } else if ty == ggml_type::BF16 {
        for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
            *o = T::from_f32(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16));
        }
    } else {
        let f = block_fn(ty).expect("decodable block type");
        let mut buf = [0f32; MAX_BLOCK];
        let buf = &mut buf[..ty.block_len];
        for (block, o) in src.chunks_exact(ty.block_bytes).zip(out.chunks_exact_mut(ty.block_len)) {
            f(block, buf);
            for (x, &v) in o.iter_mut().zip(buf.iter()) {
                *x = T::from_f32(v);
            }
        }
    }
}

/// Decodes rows `first_row..first_row + out.len() / row_len` of a tensor whose rows are stored
/// `row_bytes` apart in `src`, taking output row r from stored row `source_row(r)` (a row
/// permutation, e.g. llama.cpp's interleaving of rotary halves undone), in parallel.
pub fn decode_rows<T: Element>(
    ty: GgmlType,
    src: &[u8],
    row_len: usize,
    first_row: usize,
    source_row: &(dyn Fn(usize) -> usize + Sync),
    out: &mut [T],
) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let row_bytes = ty.row_bytes(row_len as u64).expect("whole blocks") as usize;
    let rows_per_task = (TASK_ELEMENTS / row_len).max(1);
    out.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(task, chunk)| {
        for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
            let r = source_row(first_row + task * rows_per_task + i);
            decode(ty, &src[r * row_bytes..(r + 1) * row_bytes], row);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str) -> GgmlType {
        (0..64).filter_map(GgmlType::from_id).find(|t| t.name == name).unwrap()
    }

    #[test]
    fn q4_0_and_q8_0_by_hand() {
        // d = 0.5 (f16 0x3800); byte j = (j + 1) | (15 - j) << 4.
        let mut b = vec![0x00, 0x38];
        b.extend((0..16u8).map(|j| ((j + 1) & 0xF) | (15 - j) << 4));
        let mut out = [0f32; 32];
        decode(ty("Q4_0"), &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * (((j as i32 + 1) & 0xF) - 8) as f32);
            assert_eq!(out[j + 16], 0.5 * ((15 - j as i32) - 8) as f32);
        }
        let mut b = vec![0x00, 0x3c]; // d = 1.0
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        decode(ty("Q8_0"), &b, &mut out);
        assert_eq!(out.to_vec(), (0..32).map(|j| (j - 16) as f32).collect::<Vec<_>>());
    }

    #[test]
    fn float_types_and_rounding_to_bf16() {
        let x: [f32; 3] = [1.0, -2.5, 1.0 + f32::EPSILON];
        let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = [half::bf16::ZERO; 3];
        decode(ty("F32"), &f32_bytes, &mut out);
        assert_eq!(out.map(|v| v.to_f32()), [1.0, -2.5, 1.0]);
        let bf: Vec<u8> = [0x3f80u16, 0xc020].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = [0f32; 2];
        decode(ty("BF16"), &bf, &mut out);
        assert_eq!(out, [1.0, -2.5]);
    }

    #[test]
    fn rows_follow_the_permutation() {
        let rows: Vec<f32> = (0..8 * 4).map(|i| i as f32).collect();
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0f32; 8 * 4];
        decode_rows(ty("F32"), &bytes, 4, 0, &|r| 7 - r, &mut out);
        for r in 0..8 {
            assert_eq!(&out[r * 4..r * 4 + 4], &rows[(7 - r) * 4..(7 - r) * 4 + 4]);
        }
    }
}
