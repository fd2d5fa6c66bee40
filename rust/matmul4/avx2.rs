//! AVX2 kernels (with FMA and F16C).
//!
//! Dequantize ([`decode_chunk`]) to 16-bit types: a block's 16 possible values are computed and
//! rounded once, and each value is then two byte lookups (`vpshufb`, 32 at a time) of its low and
//! high byte, put together by unpacks. To float32, and for a block's last values that do not fill
//! a group of 64: a ymm register holds 8 of the 16 code values, so a lookup is two `vpermps` (low
//! and high half of the table, indexed by bits 0-2) and a blend on bit 3, which a shift moves into
//! the sign bit that `vblendvps` reads; the table is scaled once per block.
//!
//! The products ([`gemm_rows`]) decode float32 values with byte shuffles too, at half the cost of
//! the `vpermps` lookup: on AMD Zen 3, `vpermps` holds a shuffle pipe for more than a cycle and
//! that lookup needs four of them and three shifts per 16 values, while `vpshufb` looks up 32
//! bytes at once (measured: 4096x4096 at M = 1 on one thread, 1.8-2.6x faster). The float32
//! code table is held as four 16-byte tables, one per byte of the values; four `vpshufb` give the
//! four bytes of 32 values and eight unpacks assemble them into four vectors of 8 floats: 12
//! shuffles per 32 values. The table is not scaled (that would mean rebuilding four byte tables
//! per block): each block's products are summed first and the sum multiplied by its scale, which
//! changes the rounding of the float32 sums, not their accuracy. The unpacks leave the values in a
//! fixed order within each group of 64 ([`layout_activations`]), which the activations are laid
//! out in beforehand so that no shuffle is needed to match them.
//!
//! Every function is `unsafe`: the caller guarantees the CPU has the features it enables
//! (`Isa::Avx2`, checked before dispatch).

use std::arch::x86_64::*;

use super::{portable, Weight4};
use crate::dtype::{DType, Element};
use crate::quant4::{nested_runs, BlockScales};

/// Activation rows per pass over a tile.
const PASS_ROWS: usize = 4;

/// Values per group of the product kernel: 32 packed bytes, one 16-byte half per 128-bit lane.
pub const GROUP: usize = 64;

/// How far ahead of a row its packed bytes are prefetched (see the AVX-512 module), into L1:
/// less than there, so that the prefetched bytes leave room in a 32 KiB L1 for the activations
/// (16 KiB at 4096 columns). Measured on a 2-core Zen 3, 4096x4096 at M = 1, 2 threads, weights
/// cycled from memory: 16 KiB ahead 1.4-1.7x faster than the vpermps kernel, 2-8 KiB 1.7-2.1x.
const PREFETCH_BYTES: usize = 4096;

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

    /// Values of 8 indices 0..16 (one per lane; the lanes above bit 3 may hold anything): the
    /// permutes read bits 0-2, and a shift moves bit 3 into the sign bit the blend reads.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lookup(self, index: __m256i) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(self.low, index),
            _mm256_permutevar8x32_ps(self.high, index),
            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index)),
        )
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
    (table.lookup(first), table.lookup(second))
}

/// float32 -> bfloat16 bits in the low 16 bits of each lane, rounding to nearest even and
/// quieting NaN as `half::bf16::from_f32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn bf16_bits(v: __m256) -> __m256i {
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

/// A block's 16 values (`table`, scaled) rounded to the 16-bit type `T`, as two byte tables
/// for `vpshufb`: (low bytes, high bytes), each in both lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_tables<T: Element>(table: Table) -> (__m256i, __m256i) {
    // The 16 values as 16-bit words in order.
    let words = match T::DTYPE {
        DType::F16 => {
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
            _mm256_setr_m128i(_mm256_cvtps_ph::<NEAREST>(table.low), _mm256_cvtps_ph::<NEAREST>(table.high))
        }
        _ => _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(bf16_bits(table.low), bf16_bits(table.high))),
    };
    // Low bytes, then high bytes, of each lane's 8 words; then lane 0 all low bytes, lane 1 all high.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(words, split));
    (_mm256_permute2x128_si256::<0x00>(bytes, bytes), _mm256_permute2x128_si256::<0x11>(bytes, bytes))
}

/// Decodes 64 values (32 packed bytes at `p`, one block) to 16-bit values at `dst` through the
/// block's byte tables.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_group_16bit(p: *const u8, dst: *mut u8, low: __m256i, high: __m256i, stream: bool) {
    let v = _mm256_loadu_si256(p as *const __m256i);
    let nibbles = _mm256_set1_epi8(0x0f);
    let (hi, lo) = (_mm256_and_si256(_mm256_srli_epi16::<4>(v), nibbles), _mm256_and_si256(v, nibbles));
    // Indices in element order: lane 0 holds values 0..32 of the group, lane 1 values 32..64.
    for (half, index) in [_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo)].into_iter().enumerate() {
        let (l, h) = (_mm256_shuffle_epi8(low, index), _mm256_shuffle_epi8(high, index));
        let (first, second) = (_mm256_unpacklo_epi8(l, h), _mm256_unpackhi_epi8(l, h));
        put_256(dst.add(32 * half), _mm256_permute2x128_si256::<0x20>(first, second), stream);
        put_256(dst.add(64 + 32 * half), _mm256_permute2x128_si256::<0x31>(first, second), stream);
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
    // 16-bit outputs: each block's 16 possible values rounded once, then looked up as bytes.
    let half_table = T::DTYPE != DType::F32;
    let mut start = 0;
    let mut b = 0;
    while start < n {
        let len = blocksize.min(n - start);
        let s = scale(b);
        let table = Table::new(code, s);
        let end = start + len;
        let mut done = start;
        if half_table && len >= GROUP {
            let (low, high) = half_tables::<T>(table);
            while done + GROUP <= end {
                decode_group_16bit(src.add(done / 2), dst.add(done) as *mut u8, low, high, stream);
                done += GROUP;
            }
        }
        while done + 16 <= end {
            let (lo, hi) = decode_half(src.add(done / 2), table);
            store(dst.add(done), lo, hi, stream);
            done += 16;
        }
        if done < end {
            portable::decode_block(&packed[done / 2..end.div_ceil(2)], &mut out[done..end], code, s);
        }
        start += len;
        b += 1;
    }
    if stream {
        // Streamed stores are weakly ordered: make them visible before whatever follows.
        _mm_sfence();
    }
}

/// Where the product kernel's decode leaves value `e` (0..64) of a group: position
/// `32 * nibble + 8 * q + 4 * lane + k` for the value `2 * (16 * lane + 4 * q + k) + nibble`
/// (nibble 0: the high nibble of a byte, the even value; lane: the 128-bit half, 32 values).
const POSITIONS: [u8; GROUP] = {
    let mut p = [0u8; GROUP];
    let mut e = 0;
    while e < GROUP {
        let (byte, nibble) = (e / 2, e % 2);
        let (lane, q, k) = (byte / 16, (byte % 16) / 4, byte % 4);
        p[e] = (32 * nibble + 8 * q + 4 * lane + k) as u8;
        e += 1;
    }
    p
};

/// The activations `x` (rows of `cols`, a multiple of 32) as float32 rows of
/// `cols.next_multiple_of(GROUP)`, each group of 64 in the order [`gemm_rows`] decodes the
/// weights in ([`POSITIONS`]); a last half group is padded with zeros.
pub fn layout_activations<T: Element>(x: &[T], cols: usize) -> Vec<f32> {
    debug_assert!(cols.is_multiple_of(32) && cols > 0);
    let stride = cols.next_multiple_of(GROUP);
    let mut xs = vec![0f32; x.len() / cols * stride];
    for (src, dst) in x.chunks_exact(cols).zip(xs.chunks_exact_mut(stride)) {
        for (s, d) in src.chunks(GROUP).zip(dst.chunks_exact_mut(GROUP)) {
            for (v, &at) in s.iter().zip(&POSITIONS) {
                d[at as usize] = v.to_f32();
            }
        }
    }
    xs
}

/// The float32 code table as four 16-byte tables (byte k of every value), each in both lanes.
#[derive(Clone, Copy)]
struct ByteTables([__m256i; 4]);

impl ByteTables {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn new(code: &[f32; 16]) -> ByteTables {
        let mut bytes = [[0u8; 16]; 4];
        for (i, c) in code.iter().enumerate() {
            for (k, b) in c.to_bits().to_le_bytes().into_iter().enumerate() {
                bytes[k][i] = b;
            }
        }
        ByteTables(bytes.map(|b| _mm256_broadcastsi128_si256(_mm_loadu_si128(b.as_ptr() as *const __m128i))))
    }

    /// The values of 32 indices (one per byte, 0..16) as 4 vectors of 8, vector q holding the
    /// indices at bytes 4q..4q + 4 of each lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lookup(&self, index: __m256i) -> [__m256; 4] {
        let [t0, t1, t2, t3] = self.0;
        let (b0, b1) = (_mm256_shuffle_epi8(t0, index), _mm256_shuffle_epi8(t1, index));
        let (b2, b3) = (_mm256_shuffle_epi8(t2, index), _mm256_shuffle_epi8(t3, index));
        let (low01, high01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (low23, high23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23)),
        ]
    }
}

/// See `Kernel::run` in the parent module: rows r0..r1, `xs` as [`layout_activations`] lays
/// them out, cols a multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_rows(w: &Weight4<'_>, xs: &[f32], m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
    let (k, bs) = (w.cols, w.blocksize);
    let stride = k.next_multiple_of(GROUP);
    debug_assert!(k.is_multiple_of(32) && xs.len() == m * stride && acc.len() == m * (r1 - r0));
    let tables = ByteTables::new(w.quant_type.code());
    // Both lanes of every group lie in one block when groups start on multiples of 64 and
    // blocks are at least that long; else each lane (32 values, never split) has its own.
    let shared = bs >= GROUP && k.is_multiple_of(GROUP);
    let mut decoded = Vec::new();
    for r in r0..r1 {
        // The row's block scales (double-quantized ones decoded once for all its passes).
        let (first, end) = (r * k / bs, ((r + 1) * k).div_ceil(bs));
        let scales: &[f32] = match w.scales {
            BlockScales::F32(absmax) => &absmax[first..end],
            BlockScales::Double { codes, nested_absmax, nested_map, offset } => {
                decoded.resize(end - first, 0.0);
                decode_scales(codes, nested_absmax, nested_map, offset, first, &mut decoded);
                &decoded
            }
        };
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(PASS_ROWS);
            let pass = Pass { w, tables: &tables, scales, first, xs, stride, i, r, r0, r1 };
            match (rows, shared) {
                (1, true) => pass.run::<1, true>(acc),
                (2, true) => pass.run::<2, true>(acc),
                (3, true) => pass.run::<3, true>(acc),
                (_, true) => pass.run::<4, true>(acc),
                (1, false) => pass.run::<1, false>(acc),
                (2, false) => pass.run::<2, false>(acc),
                (3, false) => pass.run::<3, false>(acc),
                (_, false) => pass.run::<4, false>(acc),
            }
            i += rows;
        }
    }
}

/// Double-quantized scales of blocks `first..first + out.len()`: `map[code] * nested + offset`,
/// 8 at a time (a gather from the 256-entry map), rounded as [`BlockScales::get`] rounds them
/// (a product, then a sum: no fused multiply-add).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_scales(codes: &[u8], nested: &[f32], map: &[f32; 256], offset: f32, first: usize, out: &mut [f32]) {
    let codes = &codes[first..first + out.len()];
    let o = _mm256_set1_ps(offset);
    for (run, group) in nested_runs(first, out.len()) {
        let scale = nested[group];
        let s = _mm256_set1_ps(scale);
        let mut i = run.start;
        while i + 8 <= run.end {
            let code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
            let value = _mm256_i32gather_ps::<4>(map.as_ptr(), code);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_add_ps(_mm256_mul_ps(value, s), o));
            i += 8;
        }
        for i in i..run.end {
            out[i] = map[codes[i] as usize] * scale + offset;
        }
    }
}

/// One pass over weight row r against activation rows i..i + MR. `scales` holds the scales of
/// blocks `first..` (those of row r).
struct Pass<'a> {
    w: &'a Weight4<'a>,
    tables: &'a ByteTables,
    scales: &'a [f32],
    first: usize,
    xs: &'a [f32],
    stride: usize,
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

impl Pass<'_> {
    /// SHARED: both lanes of every group have the same block (see [`gemm_rows`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // j indexes several arrays at once
    unsafe fn run<const MR: usize, const SHARED: bool>(&self, acc: &mut [f32]) {
        let Pass { w, tables, scales, first, xs, stride, i, r, r0, r1 } = *self;
        let k = w.cols;
        let shift = w.blocksize.trailing_zeros(); // blocksizes are powers of two
        let whole = k / GROUP;
        let row = w.packed.as_ptr().add(r * k / 2);
        let x: [*const f32; MR] = std::array::from_fn(|j| xs.as_ptr().add((i + j) * stride));
        // Prefetches never fault, so addresses past the end of the weight are harmless.
        let ahead = (PREFETCH_BYTES / (k / 2)).max(1) * k / 2;
        let nibbles = _mm256_set1_epi8(0x0f);
        // With one activation row, two sums keep more multiply-adds in flight.
        let split = MR == 1;
        let mut total = [_mm256_setzero_ps(); MR];
        for g in 0..k.div_ceil(GROUP) {
            let p = row.add(GROUP / 2 * g);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
            // A row's last half group (cols an odd multiple of 32) has only its low lane.
            let v = if g < whole {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
            };
            let mut even = [_mm256_setzero_ps(); MR];
            let mut odd = [_mm256_setzero_ps(); MR];
            for h in 0..2 {
                let index = if h == 0 { _mm256_srli_epi16::<4>(v) } else { v };
                let values = tables.lookup(_mm256_and_si256(index, nibbles));
                for q in 0..4 {
                    for j in 0..MR {
                        let xv = _mm256_loadu_ps(x[j].add(GROUP * g + 32 * h + 8 * q));
                        if split && q % 2 == 1 {
                            odd[j] = _mm256_fmadd_ps(values[q], xv, odd[j]);
                        } else {
                            even[j] = _mm256_fmadd_ps(values[q], xv, even[j]);
                        }
                    }
                }
            }
            let at = r * k + GROUP * g;
            let low = *scales.get_unchecked((at >> shift) - first);
            let s = if SHARED {
                _mm256_set1_ps(low)
            } else {
                let high = if g < whole { *scales.get_unchecked(((at + 32) >> shift) - first) } else { low };
                _mm256_setr_m128(_mm_set1_ps(low), _mm_set1_ps(high))
            };
            for j in 0..MR {
                let block_sum = if split { _mm256_add_ps(even[j], odd[j]) } else { even[j] };
                total[j] = _mm256_fmadd_ps(block_sum, s, total[j]);
            }
        }
        let width = r1 - r0;
        for j in 0..MR {
            acc[(i + j) * width + (r - r0)] = sum(total[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of a group has its own position, and a last half group is padded with zeros.
    #[test]
    fn activation_layout_is_a_permutation_with_zero_padding() {
        let mut seen = [false; GROUP];
        for &p in &POSITIONS {
            assert!(!seen[p as usize], "position {p} twice");
            seen[p as usize] = true;
        }
        let x: Vec<f32> = (1..=96).map(|v| v as f32).collect(); // one row: a group and a half
        let xs = layout_activations(&x, 96);
        assert_eq!(xs.len(), 128);
        for (e, &p) in POSITIONS.iter().enumerate() {
            assert_eq!(xs[p as usize], (e + 1) as f32);
            let tail = xs[64 + p as usize];
            assert_eq!(tail, if e < 32 { (65 + e) as f32 } else { 0.0 });
        }
    }
}
