//! AVX2 kernels (with FMA and F16C). A ymm register holds 8 of the 16 code values, so a lookup
//! is two `vpermps` (low and high half of the table, indexed by bits 0-2) and a blend on bit 3,
//! which a shift moves into the sign bit that `vblendvps` reads.
//!
//! Every function is `unsafe`: the caller guarantees the CPU has the features it enables
//! (`Isa::Avx2`, checked before dispatch).

use std::arch::x86_64::*;

use super::{portable, Weight4};
use crate::quant4::BlockScales;
use crate::dtype::{DType, Element};

/// Output rows decoded together: two tables of two registers each leave room for 8 accumulators
/// in the 16 ymm registers.
pub const TILE_ROWS: usize = 2;

/// Activation rows per pass over a tile.
const PASS_ROWS: usize = 4;

/// How far ahead of a tile its rows' packed bytes are prefetched (see the AVX-512 module).
const PREFETCH_BYTES: usize = 16384;

/// A code table split over two registers, scaled.
#[derive(Clone, Copy)]
struct Table {
    low: __m256,
    high: __m256,
}

impl Table {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn new(code: &[f32; 16], s: f32) -> Table {
        let s = _mm256_set1_ps(s);
        Table {
            low: _mm256_mul_ps(_mm256_loadu_ps(code.as_ptr()), s),
            high: _mm256_mul_ps(_mm256_loadu_ps(code.as_ptr().add(8)), s),
        }
    }

    /// Values of the 8 indices in bits 0-3 of each lane, `bit3` holding bit 3 in its sign bit.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lookup(self, index: __m256i, bit3: __m256i) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(self.low, index),
            _mm256_permutevar8x32_ps(self.high, index),
            _mm256_castsi256_ps(bit3),
        )
    }

    /// Values of 8 indices 0..16 (one per lane; the lanes above bit 3 may hold anything).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lookup_nibble(self, index: __m256i) -> __m256 {
        self.lookup(index, _mm256_slli_epi32::<28>(index))
    }
}

/// The 16 values of 8 packed bytes in element order: (elements 0..8, elements 8..16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_half(p: *const u8, table: Table) -> (__m256, __m256) {
    let bytes = _mm_loadl_epi64(p as *const __m128i);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), _mm_set1_epi8(0x0f));
    // (high nibble, whole byte) pairs index elements 2j, 2j + 1; lookups read bits 0-3.
    let order = _mm_unpacklo_epi8(high, bytes);
    let first = _mm256_cvtepu8_epi32(order);
    let second = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(order));
    (table.lookup_nibble(first), table.lookup_nibble(second))
}

/// float32 -> bfloat16 bits in the low 16 bits of each lane, rounding to nearest even and
/// quieting NaN as `half::bf16::from_f32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16_bits(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let upper = _mm256_srli_epi32::<16>(bits);
    let bias = _mm256_add_epi32(_mm256_and_si256(upper, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(rounded, _mm256_or_si256(upper, _mm256_set1_epi32(0x40)), nan)
}

/// Stores 16 values (element order) as `T`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store<T: Element>(dst: *mut T, a: __m256, b: __m256, stream: bool) {
    let d = dst as *mut u8;
    match T::DTYPE {
        DType::F32 => {
            put_256(d, _mm256_castps_si256(a), stream);
            put_256(d.add(32), _mm256_castps_si256(b), stream);
        }
        DType::F16 => {
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
            put_128(d, _mm256_cvtps_ph::<NEAREST>(a), stream);
            put_128(d.add(16), _mm256_cvtps_ph::<NEAREST>(b), stream);
        }
        DType::BF16 => {
            // packus interleaves 128-bit halves: a0-3 b0-3 a4-7 b4-7; the permute restores order.
            let packed = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
            put_256(d, _mm256_permute4x64_epi64::<0b11_01_10_00>(packed), stream);
        }
    }
}

/// Stores 32 bytes at `dst`: past the caches (non-temporal) when `stream` and `dst` is aligned.
/// (The AVX-512 level stores its 32-byte halves with it too.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn put_256(dst: *mut u8, v: __m256i, stream: bool) {
    if stream && (dst as usize).is_multiple_of(32) {
        _mm256_stream_si256(dst as *mut __m256i, v);
    } else {
        _mm256_storeu_si256(dst as *mut __m256i, v);
    }
}

/// Stores 16 bytes at `dst`, as [`put_256`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn put_128(dst: *mut u8, v: __m128i, stream: bool) {
    if stream && (dst as usize).is_multiple_of(16) {
        _mm_stream_si128(dst as *mut __m128i, v);
    } else {
        _mm_storeu_si128(dst as *mut __m128i, v);
    }
}

/// See [`super::decode_chunk`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_chunk<T: Element, F: Fn(usize) -> f32>(
    packed: &[u8],
    out: &mut [T],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
    stream: bool,
) {
    let (src, dst) = (packed.as_ptr(), out.as_mut_ptr());
    let n = out.len();
    let mut start = 0;
    let mut b = 0;
    while start < n {
        let len = blocksize.min(n - start);
        let s = scale(b);
        let table = Table::new(code, s);
        let halves = len / 16;
        for h in 0..halves {
            let e = start + 16 * h;
            let (lo, hi) = decode_half(src.add(e / 2), table);
            store(dst.add(e), lo, hi, stream);
        }
        let done = start + 16 * halves;
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

/// See `Kernel::run` in the parent module.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_rows(w: &Weight4<'_>, xs: &[f32], m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    // One instance per kind of scale, so the inner loops carry no match.
    match w.scales {
        BlockScales::F32(absmax) => rows_with(w, |b| absmax[b], xs, m, r0, r1, acc),
        scales => rows_with(w, |b| scales.get(b), xs, m, r0, r1, acc),
    }
}

/// [`gemm_rows`] with the scale of block `b` from `scale(b)`: rows r0..r1, `xs` in the 8-lane layout, cols a
/// multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
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
/// 8 at a time (two gathers), rounded as [`BlockScales::get`] rounds them.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_scales(codes: &[u8], nested: &[f32], map: &[f32; 256], offset: f32, first: usize, out: &mut [f32]) {
    let codes = &codes[first..first + out.len()];
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let whole = out.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
        let group = _mm256_srli_epi32::<8>(_mm256_add_epi32(_mm256_set1_epi32((first + i) as i32), lanes));
        let value = _mm256_i32gather_ps::<4>(map.as_ptr(), code);
        let scale = _mm256_i32gather_ps::<4>(nested.as_ptr(), group);
        let s = _mm256_add_ps(_mm256_mul_ps(value, scale), _mm256_set1_ps(offset));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), s);
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

/// Horizontal sum of 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

impl<S: Fn(usize) -> f32> Pass<'_, S> {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // t and j index several arrays of the same tile at once
    unsafe fn run<const NR: usize, const MR: usize, const ALIGNED: bool>(&self, acc: &mut [f32]) {
        let Pass { w, ref scale, tile_scales, xs, i, r, r0, r1 } = *self;
        let k = w.cols;
        let groups = k / 32;
        let shift = (w.blocksize / 32).trailing_zeros();
        let code = w.quant_type.code();
        let rows: [*const u8; NR] = std::array::from_fn(|t| w.packed.as_ptr().add((r + t) * k / 2));
        let first: [usize; NR] = std::array::from_fn(|t| (r + t) * groups);
        let x: [*const f32; MR] = std::array::from_fn(|j| xs.as_ptr().add((i + j) * k));
        // Prefetches never fault, so addresses past the end of the weight are harmless.
        let ahead = (PREFETCH_BYTES / (NR * k / 2)).max(1) * NR * k / 2;
        let split = MR == 1;
        let mut even = [[_mm256_setzero_ps(); MR]; NR];
        let mut odd = [[_mm256_setzero_ps(); MR]; NR];
        let mut g = 0;
        while g < groups {
            // A run of groups in which no row of the tile changes block.
            let mut end = groups;
            let mut tables = [Table { low: _mm256_setzero_ps(), high: _mm256_setzero_ps() }; NR];
            if ALIGNED {
                let per_row = groups >> shift;
                end = g + (1 << shift);
                for t in 0..NR {
                    tables[t] = Table::new(code, *tile_scales.get_unchecked(t * per_row + (g >> shift)));
                }
            } else {
                for t in 0..NR {
                    let b = (first[t] + g) >> shift;
                    end = end.min(((b + 1) << shift) - first[t]);
                    tables[t] = Table::new(code, scale(b));
                }
            }
            while g < end {
                for t in 0..NR {
                    _mm_prefetch::<_MM_HINT_T0>(rows[t].wrapping_add(16 * g + ahead) as *const i8);
                }
                for half in 0..2 {
                    let at = 32 * g + 16 * half;
                    for t in 0..NR {
                        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(rows[t].add(16 * g + 8 * half) as *const __m128i));
                        // Bit 7 of the byte is bit 3 of the high nibble.
                        let high = tables[t].lookup(_mm256_srli_epi32::<4>(v), _mm256_slli_epi32::<24>(v));
                        let low = tables[t].lookup_nibble(v);
                        for j in 0..MR {
                            let xe = _mm256_loadu_ps(x[j].add(at));
                            let xo = _mm256_loadu_ps(x[j].add(at + 8));
                            even[t][j] = _mm256_fmadd_ps(high, xe, even[t][j]);
                            if split {
                                odd[t][j] = _mm256_fmadd_ps(low, xo, odd[t][j]);
                            } else {
                                even[t][j] = _mm256_fmadd_ps(low, xo, even[t][j]);
                            }
                        }
                    }
                }
                g += 1;
            }
        }
        let width = r1 - r0;
        for t in 0..NR {
            for j in 0..MR {
                acc[(i + j) * width + (r - r0 + t)] = sum(_mm256_add_ps(even[t][j], odd[t][j]));
            }
        }
    }
}
