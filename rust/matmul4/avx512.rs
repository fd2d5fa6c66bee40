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

/// See `Kernel::run` in the parent module: float32 products, of the weight rounded to bfloat16
/// when `bf16_weights`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn gemm_rows(w: &Weight4<'_>, xs: &[f32], bf16_weights: bool, m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    // One instance per kind of scale, so the inner loops carry no match.
    match (w.scales, bf16_weights) {
        (BlockScales::F32(absmax), false) => rows_with::<FloatPass<false>, _, _>(w, |b| absmax[b], xs, m, r0, r1, acc),
        (scales, false) => rows_with::<FloatPass<false>, _, _>(w, |b| scales.get(b), xs, m, r0, r1, acc),
        (BlockScales::F32(absmax), true) => rows_with::<FloatPass<true>, _, _>(w, |b| absmax[b], xs, m, r0, r1, acc),
        (scales, true) => rows_with::<FloatPass<true>, _, _>(w, |b| scales.get(b), xs, m, r0, r1, acc),
    }
}

/// See `Kernel::run` in the parent module: bfloat16 activations (`xs` in groups of 64: 32 even
/// elements, then 32 odd) times the weight rounded to bfloat16, through `vdpbf16ps`; cols a
/// multiple of 64, blocks of at least 64.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
pub unsafe fn gemm_rows_dot(w: &Weight4<'_>, xs: &[bf16], m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    debug_assert!(w.cols.is_multiple_of(64) && w.blocksize >= 64);
    match w.scales {
        BlockScales::F32(absmax) => rows_with::<DotPass, _, _>(w, |b| absmax[b], xs, m, r0, r1, acc),
        scales => rows_with::<DotPass, _, _>(w, |b| scales.get(b), xs, m, r0, r1, acc),
    }
}

/// [`gemm_rows`] with the scale of block `b` from `scale(b)`: rows r0..r1, `xs` in the layout of
/// pass kind `K`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_with<K: PassKind<X>, X, S: Fn(usize) -> f32 + Copy>(
    w: &Weight4<'_>,
    scale: S,
    xs: &[X],
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
                (TILE_ROWS, 1, true) => K::run::<TILE_ROWS, 1, true, S>(&pass, acc),
                (TILE_ROWS, 2, true) => K::run::<TILE_ROWS, 2, true, S>(&pass, acc),
                (TILE_ROWS, 3, true) => K::run::<TILE_ROWS, 3, true, S>(&pass, acc),
                (TILE_ROWS, _, true) => K::run::<TILE_ROWS, 4, true, S>(&pass, acc),
                (_, 1, true) => K::run::<1, 1, true, S>(&pass, acc),
                (_, 2, true) => K::run::<1, 2, true, S>(&pass, acc),
                (_, 3, true) => K::run::<1, 3, true, S>(&pass, acc),
                (_, _, true) => K::run::<1, 4, true, S>(&pass, acc),
                (TILE_ROWS, 1, false) => K::run::<TILE_ROWS, 1, false, S>(&pass, acc),
                (TILE_ROWS, 2, false) => K::run::<TILE_ROWS, 2, false, S>(&pass, acc),
                (TILE_ROWS, 3, false) => K::run::<TILE_ROWS, 3, false, S>(&pass, acc),
                (TILE_ROWS, _, false) => K::run::<TILE_ROWS, 4, false, S>(&pass, acc),
                (_, 1, false) => K::run::<1, 1, false, S>(&pass, acc),
                (_, 2, false) => K::run::<1, 2, false, S>(&pass, acc),
                (_, 3, false) => K::run::<1, 3, false, S>(&pass, acc),
                (_, _, false) => K::run::<1, 4, false, S>(&pass, acc),
            }
            i += rows;
        }
        r += tile;
    }
}

/// Double-quantized scales of blocks `first..first + out.len()`: `map[code] * nested + offset`,
/// 16 at a time (the codes' values by [`lookup_256`]; the nested scale broadcast, or gathered where
/// the 16 straddle two groups of 256), rounded as [`BlockScales::get`] rounds them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn decode_scales(codes: &[u8], nested: &[f32], map: &[f32; 256], offset: f32, first: usize, out: &mut [f32]) {
    let codes = &codes[first..first + out.len()];
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let eighths: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(map.as_ptr().add(16 * i)));
    let whole = out.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let code = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i));
        let value = lookup_256(&eighths, code);
        // 16 blocks share one nested scale unless they straddle a group of 256.
        let (g0, g1) = ((first + i) / 256, (first + i + 15) / 256);
        let scale = if g0 == g1 {
            _mm512_set1_ps(nested[g0])
        } else {
            let group = _mm512_srli_epi32::<8>(_mm512_add_epi32(_mm512_set1_epi32((first + i) as i32), lanes));
            _mm512_i32gather_ps::<4>(group, nested.as_ptr())
        };
        let s = _mm512_add_ps(_mm512_mul_ps(value, scale), _mm512_set1_ps(offset));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), s);
    }
    for i in whole..out.len() {
        out[i] = map[codes[i] as usize] * nested[(first + i) / 256] + offset;
    }
}

/// `map[code]` of 16 codes (0..256, one a lane), the map in 16 registers (`eighths[i]`: entries
/// 16i..16i + 16): a two-register permute in each 32-entry eighth, then bits 5, 6 and 7 of each code
/// choose among the eight. A gather from the map cost about 20% of a one-row product's
/// instructions on a Zen 5 (`scripts/kernel-ab.sh` DOUBLE=1 WARM=1).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn lookup_256(eighths: &[__m512; 16], code: __m512i) -> __m512 {
    let r: [__m512; 8] = std::array::from_fn(|j| _mm512_permutex2var_ps(eighths[2 * j], code, eighths[2 * j + 1]));
    let bit = |b: i32| _mm512_test_epi32_mask(code, _mm512_set1_epi32(b));
    let (b5, b6, b7) = (bit(32), bit(64), bit(128));
    let pick = |m, lo, hi| _mm512_mask_mov_ps(lo, m, hi);
    let low = pick(b6, pick(b5, r[0], r[1]), pick(b5, r[2], r[3]));
    let high = pick(b6, pick(b5, r[4], r[5]), pick(b5, r[6], r[7]));
    pick(b7, low, high)
}

/// One pass over a tile: weight rows r..r + NR against activation rows i..i + MR, the whole row
/// length; `tile_scales` holds the tile's block scales row by row when its rows are whole blocks
/// (ALIGNED), else `scale(b)` gives block b's.
struct Pass<'a, S, X> {
    w: &'a Weight4<'a>,
    scale: S,
    tile_scales: &'a [f32],
    xs: &'a [X],
    i: usize,
    r: usize,
    r0: usize,
    r1: usize,
}

impl<S: Fn(usize) -> f32, X> Pass<'_, S, X> {
    /// Calls `scaled(t, s)` with the scale `s` of each tile row t at group `g` (of 32 values)
    /// and returns the group at which the first of them changes block.
    #[inline(always)]
    fn blocks_at<const NR: usize, const ALIGNED: bool>(&self, g: usize, mut scaled: impl FnMut(usize, f32)) -> usize {
        let w = self.w;
        let groups = w.cols / 32;
        let shift = (w.blocksize / 32).trailing_zeros();
        if ALIGNED {
            let per_row = groups >> shift;
            for t in 0..NR {
                // SAFETY (of the unchecked read): tile_scales holds NR rows of per_row scales.
                scaled(t, unsafe { *self.tile_scales.get_unchecked(t * per_row + (g >> shift)) });
            }
            g + (1 << shift)
        } else {
            let mut end = groups;
            for t in 0..NR {
                let first = (self.r + t) * groups;
                let b = (first + g) >> shift;
                end = end.min(((b + 1) << shift) - first);
                scaled(t, (self.scale)(b));
            }
            end
        }
    }

    /// The tile rows' packed bytes, the activation rows, and how far ahead of a group its
    /// prefetches reach (a whole number of tiles: the same columns of rows further down).
    /// Prefetches never fault, so addresses past the end of the weight are harmless.
    #[inline(always)]
    fn pointers<const NR: usize, const MR: usize>(&self) -> ([*const u8; NR], [*const X; MR], usize) {
        let k = self.w.cols;
        // SAFETY (of the offsets): the pass's rows lie in the weight, its activation rows in xs.
        let rows = std::array::from_fn(|t| unsafe { self.w.packed.as_ptr().add((self.r + t) * k / 2) });
        let x = std::array::from_fn(|j| unsafe { self.xs.as_ptr().add((self.i + j) * k) });
        (rows, x, (PREFETCH_BYTES / (NR * k / 2)).max(1) * NR * k / 2)
    }

    /// Writes the sums of the tile's rows for its activation rows (the lanes of `even` + `odd`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    fn finish<const NR: usize, const MR: usize>(&self, even: [[__m512; MR]; NR], odd: [[__m512; MR]; NR], acc: &mut [f32]) {
        let width = self.r1 - self.r0;
        for t in 0..NR {
            for j in 0..MR {
                acc[(self.i + j) * width + (self.r - self.r0 + t)] = _mm512_reduce_add_ps(_mm512_add_ps(even[t][j], odd[t][j]));
            }
        }
    }
}

/// The inner loops of a [`Pass`] over activations of type `X`.
trait PassKind<X> {
    /// SAFETY: the CPU has the features of the kernel that uses this kind; the pass's rows lie
    /// in the weight and `xs` holds its activation rows in this kind's layout.
    unsafe fn run<const NR: usize, const MR: usize, const ALIGNED: bool, S: Fn(usize) -> f32>(
        pass: &Pass<'_, S, X>,
        acc: &mut [f32],
    );
}

/// float32 products of the float32 weight, or with `ROUND` of the weight rounded to bfloat16
/// (the stand-in for [`DotPass`] where that cannot run).
struct FloatPass<const ROUND: bool>;
/// `vdpbf16ps` products of bfloat16 activations and the weight rounded to bfloat16.
struct DotPass;

impl<const ROUND: bool> PassKind<f32> for FloatPass<ROUND> {
    #[inline(always)]
    unsafe fn run<const NR: usize, const MR: usize, const ALIGNED: bool, S: Fn(usize) -> f32>(
        pass: &Pass<'_, S, f32>,
        acc: &mut [f32],
    ) {
        float_pass::<NR, MR, ALIGNED, ROUND, S>(pass, acc)
    }
}

impl PassKind<bf16> for DotPass {
    #[inline(always)]
    unsafe fn run<const NR: usize, const MR: usize, const ALIGNED: bool, S: Fn(usize) -> f32>(
        pass: &Pass<'_, S, bf16>,
        acc: &mut [f32],
    ) {
        dot_pass::<NR, MR, ALIGNED, S>(pass, acc)
    }
}

/// float32 values rounded to bfloat16 ([`bf16_bits`]) and widened back.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn round_to_bf16(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bf16_bits(v))))
}

/// The float32 pass (see [`PassKind`]); `ROUND`: of the weight rounded to bfloat16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // t and j index several arrays of the same tile at once
unsafe fn float_pass<const NR: usize, const MR: usize, const ALIGNED: bool, const ROUND: bool, S: Fn(usize) -> f32>(
    pass: &Pass<'_, S, f32>,
    acc: &mut [f32],
) {
    let groups = pass.w.cols / 32;
    let table = _mm512_loadu_ps(pass.w.quant_type.code().as_ptr());
    let (rows, x, ahead) = pass.pointers::<NR, MR>();
    // With one or two activation rows, even and odd halves sum apart: more independent chains.
    let split = MR <= 2;
    let mut even = [[_mm512_setzero_ps(); MR]; NR];
    let mut odd = [[_mm512_setzero_ps(); MR]; NR];
    let mut g = 0;
    while g < groups {
        // A run of groups in which no row of the tile changes block.
        let mut tables = [table; NR];
        let end = pass.blocks_at::<NR, ALIGNED>(g, |t, s| {
            let scaled = _mm512_mul_ps(table, _mm512_set1_ps(s));
            tables[t] = if ROUND { round_to_bf16(scaled) } else { scaled };
        });
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
    pass.finish(even, odd, acc);
}

/// The `vdpbf16ps` pass (see [`PassKind`]), 64 values of a row at a time. A block's table is
/// `code * scale` rounded to bfloat16 by `vcvtne2ps2bf16`, twice over in one register, so that
/// `vpermw` (which reads five bits of each index) finds a byte's low nibble through the whole
/// byte: 32 packed bytes widened to words give the odd elements' values as they are and the even
/// ones' after a shift by 4. `vdpbf16ps` adds the products of word pairs into float32 lanes, so
/// the activations come in the same order (32 even elements, then 32 odd). Both instructions
/// treat subnormal inputs as zero and flush subnormal results, which moves a sum by less than
/// 2^-126 of an activation's size.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
#[inline]
#[allow(clippy::needless_range_loop)] // t and j index several arrays of the same tile at once
unsafe fn dot_pass<const NR: usize, const MR: usize, const ALIGNED: bool, S: Fn(usize) -> f32>(
    pass: &Pass<'_, S, bf16>,
    acc: &mut [f32],
) {
    let groups = pass.w.cols / 32;
    let table = _mm512_loadu_ps(pass.w.quant_type.code().as_ptr());
    let (rows, x, ahead) = pass.pointers::<NR, MR>();
    let split = MR <= 2;
    let mut even = [[_mm512_setzero_ps(); MR]; NR];
    let mut odd = [[_mm512_setzero_ps(); MR]; NR];
    let mut g = 0;
    while g < groups {
        let mut tables = [_mm512_setzero_si512(); NR];
        let end = pass.blocks_at::<NR, ALIGNED>(g, |t, s| {
            let scaled = _mm512_mul_ps(table, _mm512_set1_ps(s));
            tables[t] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(scaled, scaled));
        });
        // Blocks hold whole 64-groups (blocksize >= 64), so a block ends on an even group.
        while g < end {
            for t in 0..NR {
                _mm_prefetch::<_MM_HINT_T0>(rows[t].wrapping_add(16 * g + ahead) as *const i8);
                let bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(rows[t].add(16 * g) as *const __m256i));
                let high: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(bytes), tables[t]));
                let low: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(bytes, tables[t]));
                for j in 0..MR {
                    let xe: __m512bh = std::mem::transmute(_mm512_loadu_si512(x[j].add(32 * g) as *const __m512i));
                    let xo: __m512bh = std::mem::transmute(_mm512_loadu_si512(x[j].add(32 * g + 32) as *const __m512i));
                    even[t][j] = _mm512_dpbf16_ps(even[t][j], high, xe);
                    if split {
                        odd[t][j] = _mm512_dpbf16_ps(odd[t][j], low, xo);
                    } else {
                        even[t][j] = _mm512_dpbf16_ps(even[t][j], low, xo);
                    }
                }
            }
            g += 2;
        }
    }
    pass.finish(even, odd, acc);
}
