//! Blockwise 4-bit quantization (NF4, FP4, INT4), bit-compatible with bitsandbytes.
//!
//! Layout: the input is read as a flat row-major vector of n elements and cut into blocks of
//! `blocksize` consecutive elements (blocks run across row boundaries; the last may be partial).
//! Each block stores its absolute maximum as float32; each element stores the nibble of the code
//! nearest to `x / absmax`. Element 2j goes to the high nibble of byte j, element 2j+1 to the low
//! nibble; for odd n the last low nibble encodes 0.0.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::blockwise8::NESTED_BLOCKSIZE;
use crate::codebook::{Encoder4, FP4_CODE, FP4_ENCODER, INT4_CODE, INT4_ENCODER, NF4_CODE, NF4_ENCODER};
use crate::cpu_isa::{Host, Isa};
use crate::dtype::{Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::matmul4;

/// Block sizes bitsandbytes supports for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Smallest absmax used as a divisor (bitsandbytes clamps to this so an all-zero block gives 0, not NaN).
pub const MIN_ABSMAX: f32 = 1e-38;

/// Elements one task quantizes or dequantizes: large enough to amortise scheduling,
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
    quantize_chunk(xs, ps, ams, encoder, None, blocksize, allow_nonfinite)
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
    let search = avx2::Search::new(encoder);
    quantize_chunk(xs, ps, ams, encoder, Some(&search), blocksize, allow_nonfinite)
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    /// No vector search off x86-64: the scalar rank count runs.
    pub struct Search;
}

/// Quantizes the blocks of one chunk; returns the first non-finite (index in chunk, value).
#[inline(always)]
fn quantize_chunk<T: Element>(
    xs: &[T],
    ps: &mut [u8],
    ams: &mut [f32],
    encoder: &Encoder4,
    search: Option<&avx2::Search>,
    blocksize: usize,
    allow_nonfinite: bool,
) -> Option<(usize, f32)> {
    for (b, ((xb, pb), am)) in xs.chunks(blocksize).zip(ps.chunks_mut(blocksize / 2)).zip(ams.iter_mut()).enumerate() {
        let full = xb.len() == blocksize;
        match quantize_block(xb, encoder, search, full, allow_nonfinite, pb) {
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
#[allow(clippy::manual_clamp)] // max(-1).min(1): only finite values reach it, where it equals clamp
fn quantize_block<T: Element>(
    xb: &[T],
    encoder: &Encoder4,
    search: Option<&avx2::Search>,
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
    #[cfg(target_arch = "x86_64")]
    if let (Some(search), true, true) = (search, full, finite) {
        // Full blocks are a multiple of 32 elements: whole groups of 16 for the vector search.
        let mut scaled = [0f32; LANE_CHUNK];
        for (xc, oc) in xb.chunks(LANE_CHUNK).zip(out.chunks_mut(LANE_CHUNK / 2)) {
            for (d, v) in scaled.iter_mut().zip(xc) {
                *d = (v.to_f32() * reciprocal).max(-1.0).min(1.0);
            }
            // SAFETY: a Search exists only where the CPU has AVX2 (quantize_chunk_avx2).
            unsafe { avx2::encode(search, &scaled[..xc.len()], oc) };
        }
        return Ok(amax);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = search;
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

/// The rank search over 8 lanes at a time (AVX2), bit-identical to the scalar count of midpoints
/// below each value: 4 comparisons of a branch-free binary search instead of 15.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::codebook::Encoder4;

    /// An encoder's 15 sorted midpoints arranged for the search, and its rank -> nibble table.
    pub struct Search {
        m3: __m256,
        m7: __m256,
        m11: __m256,
        /// Lane q: midpoint 4q + 1 (q = 0..3), the threshold of step 3.
        quarters: __m256,
        /// Lane h: midpoint 2h (h = 0..7), the threshold of step 4.
        halves: __m256,
        nibble_lo: __m256i,
        nibble_hi: __m256i,
        sorted: bool,
    }

    impl Search {
        #[target_feature(enable = "avx2")]
        pub unsafe fn new(e: &Encoder4) -> Self {
            let m = &e.midpoints;
            let n = e.nibble_of_rank.map(i32::from);
            Search {
                m3: _mm256_set1_ps(m[3]),
                m7: _mm256_set1_ps(m[7]),
                m11: _mm256_set1_ps(m[11]),
                quarters: _mm256_setr_ps(m[1], m[5], m[9], m[13], m[1], m[5], m[9], m[13]),
                halves: _mm256_setr_ps(m[0], m[2], m[4], m[6], m[8], m[10], m[12], m[14]),
                nibble_lo: _mm256_setr_epi32(n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]),
                nibble_hi: _mm256_setr_epi32(n[8], n[9], n[10], n[11], n[12], n[13], n[14], n[15]),
                sorted: e.is_sorted,
            }
        }

        /// Nibbles of 8 values in [-1, 1], one per 32-bit lane. The rank (midpoints strictly
        /// below x) is found by deciding its bits 8, 4, 2, 1 in turn; each step compares with
        /// the midpoint that splits the remaining range (a permute picks it per lane).
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn nibbles(&self, x: __m256) -> __m256i {
            let above = |m: __m256| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(x, m));
            let bit = |mask: __m256i, b: i32| _mm256_and_si256(mask, _mm256_set1_epi32(b));
            let over7 = above(self.m7);
            let mut r = bit(over7, 8);
            r = _mm256_add_epi32(r, bit(above(_mm256_blendv_ps(self.m3, self.m11, _mm256_castsi256_ps(over7))), 4));
            r = _mm256_add_epi32(r, bit(above(_mm256_permutevar8x32_ps(self.quarters, _mm256_srli_epi32::<2>(r))), 2));
            r = _mm256_add_epi32(r, bit(above(_mm256_permutevar8x32_ps(self.halves, _mm256_srli_epi32::<1>(r))), 1));
            if self.sorted {
                return r;
            }
            let lo = _mm256_permutevar8x32_epi32(self.nibble_lo, r);
            let hi = _mm256_permutevar8x32_epi32(self.nibble_hi, r);
            _mm256_blendv_epi8(lo, hi, _mm256_cmpgt_epi32(r, _mm256_set1_epi32(7)))
        }
    }

    /// Two nibbles per byte, the even element high: 8 lanes -> 4 bytes (in 32-bit lanes 0..3).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn pair_bytes(v: __m256i) -> __m128i {
        // Each 64-bit lane holds (even, odd): even << 4 | odd lands in its low 32 bits.
        let b = _mm256_or_si256(_mm256_slli_epi32::<4>(v), _mm256_srli_epi64::<32>(v));
        _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)))
    }

    /// Encodes `x` (scaled into [-1, 1]; a multiple of 16 values) into `out` (x.len() / 2 bytes).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn encode(s: &Search, x: &[f32], out: &mut [u8]) {
        debug_assert!(x.len().is_multiple_of(16) && out.len() * 2 == x.len());
        for (xs, os) in x.chunks_exact(16).zip(out.chunks_exact_mut(8)) {
            let a = pair_bytes(s.nibbles(_mm256_loadu_ps(xs.as_ptr())));
            let b = pair_bytes(s.nibbles(_mm256_loadu_ps(xs.as_ptr().add(8))));
            let words = _mm_packus_epi32(a, b);
            _mm_storel_epi64(os.as_mut_ptr() as *mut __m128i, _mm_packus_epi16(words, words));
        }
    }
}

/// The scale of each block of a packed 4-bit tensor.
#[derive(Clone, Copy, Debug)]
pub enum BlockScales<'a> {
    /// One float32 absmax per block.
    F32(&'a [f32]),
    /// Double quantization: block `b` has the scale `nested_map[codes[b]] * nested_absmax[b / 256]
    /// + offset` (two float32 roundings, no fused multiply-add: bitsandbytes' decode).
    Double { codes: &'a [u8], nested_absmax: &'a [f32], nested_map: &'a [f32; 256], offset: f32 },
}

impl BlockScales<'_> {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            BlockScales::F32(a) => a.len(),
            BlockScales::Double { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Errors unless the nested absmax has one entry per 256 block scales.
    pub fn check(&self) -> Result<()> {
        if let BlockScales::Double { codes, nested_absmax, .. } = self {
            let want = codes.len().div_ceil(NESTED_BLOCKSIZE);
            if nested_absmax.len() != want {
                return Err(Error::shape(format!(
                    "nested_absmax has {} entries; {} double-quantized block scales in groups of {NESTED_BLOCKSIZE} need {want}",
                    nested_absmax.len(),
                    codes.len()
                )));
            }
        }
        Ok(())
    }

    /// The float32 scales of blocks `first..first + out.len()`, as [`BlockScales::get`] gives
    /// them: double-quantized ones in runs that share a nested scale, one lookup and two roundings
    /// a block.
    pub fn decode_range(&self, first: usize, out: &mut [f32]) {
        match self {
            BlockScales::F32(a) => out.copy_from_slice(&a[first..first + out.len()]),
            BlockScales::Double { codes, nested_absmax, nested_map, offset } => {
                for (run, group) in nested_runs(first, out.len()) {
                    let nested = nested_absmax[group];
                    for (d, &c) in out[run.clone()].iter_mut().zip(&codes[first + run.start..first + run.end]) {
                        *d = nested_map[c as usize] * nested + offset;
                    }
                }
            }
        }
    }

    /// The float32 scale of block `b`.
    #[inline(always)]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            BlockScales::F32(a) => a[b],
            BlockScales::Double { codes, nested_absmax, nested_map, offset } => {
                nested_map[codes[b] as usize] * nested_absmax[b / NESTED_BLOCKSIZE] + offset
            }
        }
    }
}

/// Blocks `first..first + len` in runs that share a second-level (nested) scale: each run as a
/// range of offsets into `0..len`, with the index of its nested scale.
pub(crate) fn nested_runs(first: usize, len: usize) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        (i < len).then(|| {
            let group = (first + i) / NESTED_BLOCKSIZE;
            let end = ((group + 1) * NESTED_BLOCKSIZE - first).min(len);
            let run = (i..end, group);
            i = end;
            run
        })
    })
}

/// Dequantizes `packed`/`absmax` into `out` (its length is the element count n).
/// Each value is `code[nibble] * absmax` in float32, rounded once to the output type.
/// Runs the widest kernels this CPU has (capped by `QLORA_RS_CPU_ISA`, see [`crate::cpu_isa`]).
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    out: FloatSliceMut<'_>,
) -> Result<()> {
    dequantize_4bit_with(packed, BlockScales::F32(absmax), quant_type, blocksize, out, Isa::current()?)
}

/// [`dequantize_4bit`] with any [`BlockScales`] (double quantization decoded chunk by chunk, no
/// float32 copy of the scales), on the kernels of `isa` (an error if this CPU lacks it), into an
/// output already in use ([`OutputMemory::Touched`]). Every level gives bit-identical results.
pub fn dequantize_4bit_with(
    packed: &[u8],
    scales: BlockScales<'_>,
    quant_type: QuantType,
    blocksize: usize,
    out: FloatSliceMut<'_>,
    isa: Isa,
) -> Result<()> {
    dequantize_4bit_into(packed, scales, quant_type, blocksize, out, isa, OutputMemory::Touched, Host::Native)
}

/// What the output of a decode is, which decides how it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputMemory {
    /// Just allocated, its pages not touched yet: written through the cache. The OS zeroes each
    /// page into the cache as it first maps it, and streaming stores past the cache then cost
    /// more (4096x4096 bf16 into a new tensor: 9.2 ms cached, 11.7-14.4 streamed).
    Fresh,
    /// A buffer in use (its pages mapped): outputs of [`matmul4::STREAM_MIN_BYTES`] and more are
    /// written past the caches.
    Touched,
}

/// [`dequantize_4bit_with`] into an output of the given kind, on the given host (an emulated
/// CPU: one thread, the level not checked).
#[allow(clippy::too_many_arguments)]
pub fn dequantize_4bit_into(
    packed: &[u8],
    scales: BlockScales<'_>,
    quant_type: QuantType,
    blocksize: usize,
    out: FloatSliceMut<'_>,
    isa: Isa,
    memory: OutputMemory,
    host: Host,
) -> Result<()> {
    check_buffers(out.len(), blocksize, packed.len(), scales.len())?;
    scales.check()?;
    host.check(isa)?;
    let stream = memory == OutputMemory::Touched && out.len() * out.dtype().size() >= matmul4::STREAM_MIN_BYTES;
    match out {
        FloatSliceMut::F32(o) => dequantize_typed(packed, scales, quant_type, blocksize, o, isa, stream, host),
        FloatSliceMut::F16(o) => dequantize_typed(packed, scales, quant_type, blocksize, o, isa, stream, host),
        FloatSliceMut::BF16(o) => dequantize_typed(packed, scales, quant_type, blocksize, o, isa, stream, host),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dequantize_typed<T: Element>(
    packed: &[u8],
    scales: BlockScales<'_>,
    quant_type: QuantType,
    blocksize: usize,
    out: &mut [T],
    isa: Isa,
    stream: bool,
    host: Host,
) {
    let code = quant_type.code();
    let chunk = chunk_elements(blocksize);
    let n = out.len();
    let chunks = n.div_ceil(chunk);
    // A forward pass decodes between PyTorch's ops: on their OpenMP team (crate::threads).
    let out = SharedOut(out.as_mut_ptr());
    let next = AtomicUsize::new(0);
    // (One chunk runs here alone: no need to look the team up.)
    let threads = if chunks > 1 { host.team_size().min(chunks) } else { 1 };
    crate::threads::run_team(threads, &|| loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        if c >= chunks {
            break;
        }
        let (start, end) = (c * chunk, (c * chunk + chunk).min(n));
        // SAFETY: chunks are disjoint ranges of `out`, each taken by one thread once.
        let os = unsafe { std::slice::from_raw_parts_mut(out.at(start), end - start) };
        let ps = &packed[start / 2..end.div_ceil(2)];
        // The chunk's scales first, in one tight loop, rather than a lookup per block inside the decode.
        let mut scale = [0f32; CHUNK_ELEMENTS / BLOCKSIZES[0]];
        let scale = &mut scale[..(end - start).div_ceil(blocksize)];
        scales.decode_range(c * (chunk / blocksize), scale);
        // SAFETY: `isa` was checked to be supported by this CPU, or the emulated one (dequantize_4bit_into).
        unsafe { matmul4::decode_chunk(isa, ps, os, code, blocksize, |b| scale[b], stream) }
    });
}

/// The output of [`dequantize_typed`], written by several threads in disjoint chunks.
struct SharedOut<T>(*mut T);

// SAFETY: the threads write disjoint chunks of a buffer that outlives them.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// SAFETY: `i` is within the buffer.
    unsafe fn at(&self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    use crate::dtype::DType;

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

    /// The AVX2 search against the scalar count, value by value: every midpoint, its float
    /// neighbours, the codes, +-0, +-1 and a dense sweep of [-1, 1], for each code table.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_search_equals_the_scalar_count() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        for qt in [QuantType::Nf4, QuantType::Fp4, QuantType::Int4] {
            let enc = qt.encoder();
            let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0];
            for &m in &enc.midpoints {
                xs.extend([m, f32::from_bits(m.to_bits() + 1), f32::from_bits(m.to_bits().wrapping_sub(1)), -m]);
            }
            xs.extend(qt.code().iter().copied());
            xs.extend((0..20_000).map(|i| i as f32 / 10_000.0 - 1.0));
            xs.retain(|x| x.abs() <= 1.0);
            while !xs.len().is_multiple_of(16) {
                xs.push(0.5);
            }
            let mut got = vec![0u8; xs.len() / 2];
            // SAFETY: AVX2 checked above.
            unsafe { avx2::encode(&avx2::Search::new(enc), &xs, &mut got) };
            for (j, pair) in xs.chunks(2).enumerate() {
                let want = (enc.encode(pair[0]) << 4) | enc.encode(pair[1]);
                assert_eq!(got[j], want, "{qt:?}: values {} and {}", pair[0], pair[1]);
            }
        }
    }

    /// Every value of the decode equals `code[nibble] * absmax` rounded once, for
    /// each output type, block size and length (whole 16-byte groups, partial blocks, odd n).
    #[test]
    fn decode_equals_the_table_value_everywhere() {
        fn check<T: Element + PartialEq + std::fmt::Debug>(n: usize, bs: usize, qt: QuantType) {
            let packed: Vec<u8> = (0..packed_len(n)).map(|i| (i * 97 + 13) as u8).collect();
            let absmax: Vec<f32> = (0..num_blocks(n, bs)).map(|b| 0.5 + b as f32 * 0.37).collect();
            let mut out = vec![T::from_f32(f32::NAN); n];
            let slice = match T::DTYPE {
                DType::F32 => FloatSliceMut::F32(unsafe { std::mem::transmute::<&mut [T], &mut [f32]>(&mut out[..]) }),
                DType::F16 => FloatSliceMut::F16(unsafe { std::mem::transmute::<&mut [T], &mut [half::f16]>(&mut out[..]) }),
                DType::BF16 => FloatSliceMut::BF16(unsafe { std::mem::transmute::<&mut [T], &mut [bf16]>(&mut out[..]) }),
            };
            dequantize_4bit(&packed, &absmax, qt, bs, slice).unwrap();
            for (i, o) in out.iter().enumerate() {
                let nib = if i % 2 == 0 { packed[i / 2] >> 4 } else { packed[i / 2] & 15 };
                let want = T::from_f32(qt.code()[nib as usize] * absmax[i / bs]);
                assert_eq!(*o, want, "{:?} n={n} bs={bs} i={i}", T::DTYPE);
            }
        }
        for n in [1, 31, 32, 33, 64, 65, 100, 4097, 3 * CHUNK_ELEMENTS + 5] {
            for bs in [32, 64, 4096] {
                check::<f32>(n, bs, QuantType::Nf4);
                check::<half::f16>(n, bs, QuantType::Fp4);
                check::<bf16>(n, bs, QuantType::Nf4);
            }
        }
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
