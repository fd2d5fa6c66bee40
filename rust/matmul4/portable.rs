//! Plain Rust kernels: every CPU runs them, and the vector levels use them for what their
//! groups of 32 do not cover (rows of any length, the tail of a partial block).

use half::bf16;

use super::Weight4;
use crate::dtype::Element;

/// Decodes one block (`out.len()` values, the first at an even element) with scale `s`.
#[inline(always)]
pub fn decode_block<T: Element>(packed: &[u8], out: &mut [T], code: &[f32; 16], s: f32) {
    let lut: [T; 16] = std::array::from_fn(|i| T::from_f32(code[i] * s));
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &byte) in (&mut pairs).zip(packed) {
        o[0] = lut[(byte >> 4) as usize];
        o[1] = lut[(byte & 0x0f) as usize];
    }
    if let [last] = pairs.into_remainder() {
        *last = lut[(packed[packed.len() - 1] >> 4) as usize];
    }
}

/// See [`super::decode_chunk`].
pub fn decode_chunk<T: Element, F: Fn(usize) -> f32>(
    packed: &[u8],
    out: &mut [T],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
) {
    for (b, (ob, pb)) in out.chunks_mut(blocksize).zip(packed.chunks(blocksize / 2)).enumerate() {
        decode_block(pb, ob, code, scale(b));
    }
}

/// Row sums `acc[i][r - r0] = sum_c x[i][c] * W[r][c]` for rows r0..r1, `xs` in natural order;
/// with `bf16_weights`, of the weight rounded to bfloat16. Rows of any length: a row may start in
/// the middle of a byte and of a block.
pub fn gemm_rows(w: &Weight4<'_>, xs: &[f32], bf16_weights: bool, m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    let width = r1 - r0;
    for r in r0..r1 {
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            match rows {
                1 => put(row::<1>(w, xs, bf16_weights, i, r), acc, i, width, r - r0),
                2 => put(row::<2>(w, xs, bf16_weights, i, r), acc, i, width, r - r0),
                3 => put(row::<3>(w, xs, bf16_weights, i, r), acc, i, width, r - r0),
                _ => put(row::<4>(w, xs, bf16_weights, i, r), acc, i, width, r - r0),
            }
            i += rows;
        }
    }
}

fn put<const MR: usize>(sums: [f32; MR], acc: &mut [f32], i: usize, width: usize, col: usize) {
    for (j, s) in sums.into_iter().enumerate() {
        acc[(i + j) * width + col] = s;
    }
}

/// Weight row `r` against activation rows `i..i + MR`.
#[inline(always)]
fn row<const MR: usize>(w: &Weight4<'_>, xs: &[f32], bf16_weights: bool, i: usize, r: usize) -> [f32; MR] {
    let k = w.cols;
    let code = w.quant_type.code();
    let x: [&[f32]; MR] = std::array::from_fn(|j| &xs[(i + j) * k..(i + j + 1) * k]);
    let p = w.packed;
    let start = r * k;
    let mut sum = [0f32; MR];
    let mut c = 0;
    while c < k {
        let b = (start + c) / w.blocksize;
        let end = ((b + 1) * w.blocksize - start).min(k);
        let s = w.scales.get(b);
        let lut: [f32; 16] = std::array::from_fn(|n| {
            let v = code[n] * s;
            if bf16_weights { bf16::from_f32(v).to_f32() } else { v }
        });
        if (start + c) % 2 == 1 {
            // A row of odd length starts on a low nibble (only at the row start: blocks are even).
            let v = lut[(p[(start + c) / 2] & 0x0f) as usize];
            for j in 0..MR {
                sum[j] += v * x[j][c];
            }
            c += 1;
        }
        while c + 1 < end {
            let byte = p[(start + c) / 2];
            let (hi, lo) = (lut[(byte >> 4) as usize], lut[(byte & 0x0f) as usize]);
            for j in 0..MR {
                sum[j] += hi * x[j][c] + lo * x[j][c + 1];
            }
            c += 2;
        }
        if c < end {
            let v = lut[(p[(start + c) / 2] >> 4) as usize];
            for j in 0..MR {
                sum[j] += v * x[j][c];
            }
            c += 1;
        }
    }
    sum
}
