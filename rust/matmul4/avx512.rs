//! AVX-512 kernels (F, BW, VL; AVX512-BF16 only where named). The 16-entry code table fits one
//! zmm register, so `vpermps` turns 16 nibbles into 16 float32 values in one instruction; it reads
//! only the low 4 bits of each index lane, so a whole zero-extended byte indexes its low nibble.
//!
//! Every function is `unsafe`: the caller guarantees the CPU has the features it enables
//! (`Isa::Avx512` / `Isa::Avx512Bf16`, checked before dispatch).

use std::arch::x86_64::*;

use half::bf16;

use super::avx2::put_256;
use super::{portable, Weight4};
use crate::quant4::BlockScales;
use crate::dtype::{DType, Element};

/// Output rows decoded together: their four tables and up to 16 accumulators fit the 32 registers.
pub const TILE_ROWS: usize = 4;

/// Activation rows per pass over a tile.
const PASS_ROWS: usize = 4;

/// How far ahead of a tile its rows' packed bytes are prefetched (a whole number of tiles, the
/// same columns of rows further down). The hardware prefetcher follows each row, but a tile's rows
/// are short streams (2 KiB at 4096 columns) that it keeps having to pick up again: measured on
/// 4096x4096 at M = 1, one thread, 16 KiB ahead decodes 10-30% faster than none.
const PREFETCH_BYTES: usize = 16384;

/// The 32 values of 16 packed bytes in element order: (elements 0..16, elements 16..32).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_group(p: *const u8, table: __m512) -> (__m512, __m512) {
    let bytes = _mm_loadu_si128(p as *const __m128i);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), _mm_set1_epi8(0x0f));
    // (high nibble, whole byte) pairs are the indices of elements 2j, 2j + 1.
    let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, bytes));
    let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, bytes));
    (_mm512_permutexvar_ps(first, table), _mm512_permutexvar_ps(second, table))
}

/// float32 -> bfloat16 bits, rounding to nearest even and quieting NaN as `half::bf16::from_f32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn bf16_bits(v: __m512) -> __m256i {
    let bits = _mm512_castps_si512(v);
    let upper = _mm512_srli_epi32::<16>(bits);
    let bias = _mm512_add_epi32(_mm512_and_si512(upper, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(upper, _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
}

/// Stores 64 bytes at `dst`: past the caches (non-temporal) when `stream` and `dst` is aligned.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn put_512(dst: *mut u8, v: __m512i, stream: bool) {
    if stream && (dst as usize).is_multiple_of(64) {
        _mm512_stream_si512(dst as *mut __m512i, v);
    } else {
        _mm512_storeu_si512(dst as *mut __m512i, v);
    }
}

/// Stores 32 values (element order) as `T` (see [`put_512`] for `stream`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn store<T: Element>(dst: *mut T, a: __m512, b: __m512, stream: bool) {
    let d = dst as *mut u8;
    match T::DTYPE {
        DType::F32 => {
            put_512(d, _mm512_castps_si512(a), stream);
            put_512(d.add(64), _mm512_castps_si512(b), stream);
        }
        DType::F16 => {
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
            put_256(d, _mm512_cvtps_ph::<NEAREST>(a), stream);
            put_256(d.add(32), _mm512_cvtps_ph::<NEAREST>(b), stream);
        }
        DType::BF16 => {
            put_256(d, bf16_bits(a), stream);
            put_256(d.add(32), bf16_bits(b), stream);
        }
    }
}

/// See [`super::decode_chunk`]. `put(dst, a, b)` stores 32 decoded values of a block with scale `s`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_blocks<T: Element, F: Fn(usize) -> f32, P: Fn(*mut T, __m512, __m512, f32)>(
    packed: &[u8],
    out: &mut [T],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
    stream: bool,
    put: P,
) {
    let table = _mm512_loadu_ps(code.as_ptr());
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    let n = out.len();
    let mut start = 0;
    let mut b = 0;
    while start < n {
        let len = blocksize.min(n - start);
        let s = scale(b);
        let scaled = _mm512_mul_ps(table, _mm512_set1_ps(s));
        let groups = len / 32;
        for g in 0..groups {
            let e = start + 32 * g;
            let (lo, hi) = decode_group(src.add(e / 2), scaled);
            put(dst.add(e), lo, hi, s);
        }
        let done = start + 32 * groups;
        if done < start + len {
            portable::decode_block(&packed[done / 2..(start + len).div_ceil(2)], &mut out[done..start + len], code, s);
        }
        start += len;
        b += 1;
    }
    if stream {
        // Streamed stores are weakly ordered: make them visible before whatever follows.
        _mm_sfence();
    }
}

/// See [`super::decode_chunk`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn decode_chunk<T: Element, F: Fn(usize) -> f32>(
    packed: &[u8],
    out: &mut [T],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
    stream: bool,
) {
    decode_blocks(packed, out, code, blocksize, scale, stream, |dst, a, b, _| store(dst, a, b, stream));
}

/// Scales below this may give products under the float32 normal range, which
/// `vcvtne2ps2bf16` flushes to zero (it ignores MXCSR): such blocks round in integer code.
const SUBNORMAL_RISK: f32 = 1.0e-35;

/// [`decode_chunk`] into bfloat16 with `vcvtne2ps2bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
pub unsafe fn decode_chunk_bf16_native<F: Fn(usize) -> f32>(
    packed: &[u8],
    out: &mut [bf16],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
    stream: bool,
) {
    decode_blocks(packed, out, code, blocksize, scale, stream, |dst, a, b, s| {
        if s.abs() >= SUBNORMAL_RISK || s.is_nan() {
            // Low half from the second operand: elements 0..16 first.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            put_512(dst as *mut u8, v, stream);
        } else {
            store(dst, a, b, stream);
        }
    });
}

/// See `Kernel::run` in the parent module.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn gemm_rows(w: &Weight4<'_>, xs: &[f32], m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    // One instance per kind of scale, so the inner loops carry no match.
    match w.scales {
        BlockScales::F32(absmax) => rows_with(w, |b| absmax[b], xs, m, r0, r1, acc),
        scales => rows_with(w, |b| scales.get(b), xs, m, r0, r1, acc),
    }
}

/// [`gemm_rows`] with the scale of block `b` from `scale(b)`: rows r0..r1, `xs` in the 16-lane layout, cols a
/// multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_with<S: Fn(usize) -> f32 + Copy>(
    w: &Weight4<'_>,
    scale: S,
    xs: &[f32],
    m: usize,
    r0: usize,
    r1: usize,
    acc: &mut [f32],
) {
    debug_assert!(w.cols.is_multiple_of(32) && xs.len() == m * w.cols && acc.len() == m * (r1 - r0));
    // Rows made of whole blocks (the usual case) change block at the same columns: a tile reads
    // its scales from one slice, float32 or decoded once for all its passes.
    let aligned = w.cols.is_multiple_of(w.blocksize);
    let per_row = w.cols / w.blocksize;
    let mut decoded = Vec::new();
    let mut r = r0;
    while r < r1 {
        let tile = if r1 - r >= TILE_ROWS { TILE_ROWS } else { 1 };
        let blocks = r * per_row..(r + tile) * per_row;
        let tile_scales: &[f32] = match (aligned, w.scales) {
            (false, _) => &[],
            (true, BlockScales::F32(absmax)) => &absmax[blocks],
            (true, BlockScales::Double { codes, nested_absmax, nested_map, offset }) => {
                decoded.resize(blocks.len(), 0.0);
                decode_scales(codes, nested_absmax, nested_map, offset, blocks.start, &mut decoded);
                &decoded
            }
        };
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(PASS_ROWS);
            let pass = Pass { w, scale, tile_scales, xs, i, r, r0, r1 };
            match (tile, rows, aligned) {
                (TILE_ROWS, 1, true) => pass.run::<TILE_ROWS, 1, true>(acc),
                (TILE_ROWS, 2, true) => pass.run::<TILE_ROWS, 2, true>(acc),
                (TILE_ROWS, 3, true) => pass.run::<TILE_ROWS, 3, true>(acc),
                (TILE_ROWS, _, true) => pass.run::<TILE_ROWS, 4, true>(acc),
                (_, 1, true) => pass.run::<1, 1, true>(acc),
                (_, 2, true) => pass.run::<1, 2, true>(acc),
                (_, 3, true) => pass.run::<1, 3, true>(acc),
                (_, _, true) => pass.run::<1, 4, true>(acc),
                (TILE_ROWS, 1, false) => pass.run::<TILE_ROWS, 1, false>(acc),
                (TILE_ROWS, 2, false) => pass.run::<TILE_ROWS, 2, false>(acc),
                (TILE_ROWS, 3, false) => pass.run::<TILE_ROWS, 3, false>(acc),
                (TILE_ROWS, _, false) => pass.run::<TILE_ROWS, 4, false>(acc),
                (_, 1, false) => pass.run::<1, 1, false>(acc),
                (_, 2, false) => pass.run::<1, 2, false>(acc),
                (_, 3, false) => pass.run::<1, 3, false>(acc),
                (_, _, false) => pass.run::<1, 4, false>(acc),
            }
            i += rows;
        }
        r += tile;
    }
}

/// Double-quantized scales of blocks `first..first + out.len()`: `map[code] * nested + offset`,
/// 16 at a time (two gathers), rounded as [`BlockScales::get`] rounds them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn decode_scales(codes: &[u8], nested: &[f32], map: &[f32; 256], offset: f32, first: usize, out: &mut [f32]) {
    let codes = &codes[first..first + out.len()];
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let whole = out.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let code = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i));
        let group = _mm512_srli_epi32::<8>(_mm512_add_epi32(_mm512_set1_epi32((first + i) as i32), lanes));
        let value = _mm512_i32gather_ps::<4>(code, map.as_ptr());
        let scale = _mm512_i32gather_ps::<4>(group, nested.as_ptr());
        let s = _mm512_add_ps(_mm512_mul_ps(value, scale), _mm512_set1_ps(offset));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), s);
    }
    for i in whole..out.len() {
        out[i] = map[codes[i] as usize] * nested[(first + i) / 256] + offset;
    }
}

/// One pass over a tile: weight rows r..r + NR against activation rows i..i + MR, the whole row
/// length; `tile_scales` holds the tile's block scales row by row when its rows are whole blocks
/// (ALIGNED), else `scale(b)` gives block b's.
struct Pass<'a, S> {
    w: &'a Weight4<'a>,
    scale: S,
    tile_scales: &'a [f32],
    xs: &'a [f32],
    i: usize,
    r: usize,
    r0: usize,
    r1: usize,
}

impl<S: Fn(usize) -> f32> Pass<'_, S> {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // t and j index several arrays of the same tile at once
    unsafe fn run<const NR: usize, const MR: usize, const ALIGNED: bool>(&self, acc: &mut [f32]) {
        let Pass { w, ref scale, tile_scales, xs, i, r, r0, r1 } = *self;
        let k = w.cols;
        let groups = k / 32;
        // Blocks hold a power-of-two number of groups; rows start on a group.
        let shift = (w.blocksize / 32).trailing_zeros();
        let table = _mm512_loadu_ps(w.quant_type.code().as_ptr());
        let rows: [*const u8; NR] = std::array::from_fn(|t| w.packed.as_ptr().add((r + t) * k / 2));
        let first: [usize; NR] = std::array::from_fn(|t| (r + t) * groups);
        let x: [*const f32; MR] = std::array::from_fn(|j| xs.as_ptr().add((i + j) * k));
        let ahead = (PREFETCH_BYTES / (NR * k / 2)).max(1) * NR * k / 2;
        // Prefetches never fault, so addresses past the end of the weight are harmless.
        // With one or two activation rows, even and odd halves sum apart: more independent chains.
        let split = MR <= 2;
        let mut even = [[_mm512_setzero_ps(); MR]; NR];
        let mut odd = [[_mm512_setzero_ps(); MR]; NR];
        let mut g = 0;
        while g < groups {
            // A run of groups in which no row of the tile changes block.
            let mut end = groups;
            let mut tables = [table; NR];
            if ALIGNED {
                let per_row = groups >> shift;
                end = g + (1 << shift);
                for t in 0..NR {
                    let s = *tile_scales.get_unchecked(t * per_row + (g >> shift));
                    tables[t] = _mm512_mul_ps(table, _mm512_set1_ps(s));
                }
            } else {
                for t in 0..NR {
                    let b = (first[t] + g) >> shift;
                    end = end.min(((b + 1) << shift) - first[t]);
                    tables[t] = _mm512_mul_ps(table, _mm512_set1_ps(scale(b)));
                }
            }
            while g < end {
                for t in 0..NR {
                    _mm_prefetch::<_MM_HINT_T0>(rows[t].wrapping_add(16 * g + ahead) as *const i8);
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(rows[t].add(16 * g) as *const __m128i));
                    let high = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tables[t]);
                    let low = _mm512_permutexvar_ps(v, tables[t]);
                    for j in 0..MR {
                        let xe = _mm512_loadu_ps(x[j].add(32 * g));
                        let xo = _mm512_loadu_ps(x[j].add(32 * g + 16));
                        even[t][j] = _mm512_fmadd_ps(high, xe, even[t][j]);
                        if split {
                            odd[t][j] = _mm512_fmadd_ps(low, xo, odd[t][j]);
                        } else {
                            even[t][j] = _mm512_fmadd_ps(low, xo, even[t][j]);
                        }
                    }
                }
                g += 1;
            }
        }
        let width = r1 - r0;
        for t in 0..NR {
            for j in 0..MR {
                acc[(i + j) * width + (r - r0 + t)] = _mm512_reduce_add_ps(_mm512_add_ps(even[t][j], odd[t][j]));
            }
        }
    }
}
