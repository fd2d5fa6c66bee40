//! A LoRA adapter's share of a layer's output on CPU inference: `y += (B @ (A @ x)) * scaling` for
//! a few rows, as `qlora_rs.nn.LoraLinear4bit` adds it to its 4-bit base layer's product, in one
//! call where PyTorch runs six ops of 3-5 us each (a 135M-parameter model with adapters on its 210
//! linear layers spends ~5 ms a generated token on them).
//!
//! The adapters are of one float dtype `L` (float32 is PEFT's and our default `lora_dtype`; TRL
//! casts them to bfloat16): `x` is rounded to `L`, both products sum in float32 and are rounded to
//! `L`, the scaling multiplies in float32 and that is rounded to `L`, then to `y`'s dtype, and added
//! to `y`, the sum rounded once more, as the ops round (for float32 adapters the roundings to `L`
//! change nothing). The products sum in their own order, not in that of PyTorch's GEMM (which has
//! its own for each CPU), so results agree with the ops within float32 summation error rather than
//! bit for bit.

use crate::cpu_isa::{Host, Isa};
use crate::decode::{check_lengths, PARALLEL_MIN_WORK};
use crate::dtype::{DType, Element, FloatSlice, FloatSliceMut};
#[cfg(target_arch = "x86_64")]
use crate::matmul4::avx2::bf16_bits;
use crate::error::{Error, Result};

/// The sizes of [`lora_add`]: `rows` of `in_features` in, `rank`, `out_features` out.
#[derive(Clone, Copy, Debug)]
pub struct LoraShape {
    pub rows: usize,
    pub in_features: usize,
    pub rank: usize,
    pub out_features: usize,
}

/// Outputs one task of the second product covers (when the work is large enough to share).
const OUT_PER_TASK: usize = 256;

/// `y[r] += round_y((B @ (A @ x[r])) * scaling)` with the roundings of the module doc, for each
/// row r: `x` `[rows, in_features]`, `a` `[rank, in_features]`, `b` `[out_features, rank]`, `y`
/// `[rows, out_features]`, all contiguous; `a` and `b` of one float dtype, `x` and `y` of any. On
/// `host`'s threads (one on an emulated CPU).
#[allow(clippy::too_many_arguments)]
pub fn lora_add(
    x: FloatSlice<'_>,
    a: FloatSlice<'_>,
    b: FloatSlice<'_>,
    scaling: f32,
    shape: LoraShape,
    y: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
) -> Result<()> {
    let LoraShape { rows, in_features, rank, out_features } = shape;
    let want = [
        ("x", x.len(), rows * in_features),
        ("lora_A", a.len(), rank * in_features),
        ("lora_B", b.len(), out_features * rank),
        ("y", y.len(), rows * out_features),
    ];
    check_lengths("lora_add", &shape, &want)?;
    if rank == 0 || in_features == 0 {
        return Err(Error::shape(format!("lora_add: {shape:?}: an adapter needs a rank and in_features of at least 1")));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::shape(format!("lora_add: lora_A is {}, lora_B {}; expected one dtype", a.dtype().name(), b.dtype().name())));
    }
    host.check(isa)?;
    if rows == 0 || out_features == 0 {
        return Ok(());
    }
    match (a, b) {
        (FloatSlice::F32(a), FloatSlice::F32(b)) => with_adapter(x, a, b, scaling, shape, y, isa, host),
        (FloatSlice::F16(a), FloatSlice::F16(b)) => with_adapter(x, a, b, scaling, shape, y, isa, host),
        (FloatSlice::BF16(a), FloatSlice::BF16(b)) => with_adapter(x, a, b, scaling, shape, y, isa, host),
        _ => unreachable!("dtypes checked above"),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn with_adapter<L: Element>(
    x: FloatSlice<'_>,
    a: &[L],
    b: &[L],
    scaling: f32,
    shape: LoraShape,
    y: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
) {
    // x.to(L): exact for float32 adapters, a rounding for 16-bit ones of wider activations.
    let xf: Vec<f32> = match x {
        FloatSlice::F32(x) => x.iter().map(|v| round::<L>(*v)).collect(),
        FloatSlice::F16(x) => x.iter().map(|v| round::<L>(v.to_f32())).collect(),
        FloatSlice::BF16(x) => x.iter().map(|v| round::<L>(v.to_f32())).collect(),
    };
    match y {
        FloatSliceMut::F32(y) => add(&xf, a, b, scaling, shape, y, isa, host),
        FloatSliceMut::F16(y) => add(&xf, a, b, scaling, shape, y, isa, host),
        FloatSliceMut::BF16(y) => add(&xf, a, b, scaling, shape, y, isa, host),
    }
}

/// `v` rounded to `L` (and back to float32, exactly).
#[inline(always)]
fn round<L: Element>(v: f32) -> f32 {
    if L::DTYPE == DType::F32 {
        v
    } else {
        L::from_f32(v).to_f32()
    }
}

/// `y`'s rows shared by the tasks of the second product (each writes its own columns).
struct SharedOut<T>(*mut T);
// SAFETY: tasks write disjoint elements of a buffer that outlives them.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The buffer (a method, so that closures capture the whole wrapper, not its pointer).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

#[allow(clippy::too_many_arguments)]
fn add<L: Element, Y: Element>(x: &[f32], a: &[L], b: &[L], scaling: f32, shape: LoraShape, y: &mut [Y], isa: Isa, host: Host) {
    let LoraShape { rows, in_features, rank, out_features } = shape;
    let work = rows.saturating_mul(rank).saturating_mul(in_features + out_features);
    let threads = if work < PARALLEL_MIN_WORK { 1 } else { host.team_size() };
    // t = A @ x: `rank` dot products a row, few enough to run on one thread unless `x` is long.
    let mut t = vec![0f32; rows * rank];
    if threads <= 1 || rank * in_features < PARALLEL_MIN_WORK {
        down_products(isa, x, a, in_features, &mut t);
    } else {
        let shared = SharedOut(t.as_mut_ptr());
        crate::threads::run_tasks(threads, rank, &|j| {
            let mut col = vec![0f32; rows];
            down_products(isa, x, &a[j * in_features..(j + 1) * in_features], in_features, &mut col);
            for (r, v) in col.into_iter().enumerate() {
                // SAFETY: element (r, j) of t is in bounds and written by task j alone.
                unsafe { *shared.at(r * rank + j) = v };
            }
        });
    }
    let tasks = out_features.div_ceil(OUT_PER_TASK);
    let shared = SharedOut(y.as_mut_ptr());
    crate::threads::run_tasks(if tasks > 1 { threads } else { 1 }, tasks, &|task| {
        let outs = task * OUT_PER_TASK..((task + 1) * OUT_PER_TASK).min(out_features);
        for r in 0..rows {
            // SAFETY: columns `outs` of row r are in bounds and written by this task alone.
            let yr = unsafe { std::slice::from_raw_parts_mut(shared.at(r * out_features + outs.start), outs.len()) };
            up_products(isa, &t[r * rank..(r + 1) * rank], &b[outs.start * rank..outs.end * rank], scaling, yr);
        }
    });
}

/// `t[r * n + j] = round_L(a_j . x_r)` for the `n = a.len() / k` rows `a_j` of `a` and each row
/// `x_r` of `x`.
fn down_products<L: Element>(isa: Isa, x: &[f32], a: &[L], k: usize, t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: every level above portable has AVX2 and FMA (the caller checked `isa`).
        return unsafe { down_products_avx2(x, a, k, t) };
    }
    let _ = isa;
    down_products_generic(x, a, k, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn down_products_avx2<L: Element>(x: &[f32], a: &[L], k: usize, t: &mut [f32]) {
    down_products_generic(x, a, k, t)
}

#[inline(always)]
fn down_products_generic<L: Element>(x: &[f32], a: &[L], k: usize, t: &mut [f32]) {
    let n = a.len() / k;
    for (r, xr) in x.chunks_exact(k).enumerate() {
        for (j, aj) in a.chunks_exact(k).enumerate() {
            t[r * n + j] = round::<L>(dot(aj, xr));
        }
    }
}

/// `y[o] = round_y(y[o] + round_y(round_L(scaling * round_L(b_o . t))))` for the rows `b_o` of `b`
/// (of `t.len()`).
fn up_products<L: Element, Y: Element>(isa: Isa, t: &[f32], b: &[L], scaling: f32, y: &mut [Y]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: as in `down_products`.
        return unsafe { up_products_avx2(t, b, scaling, y) };
    }
    let _ = isa;
    up_products_generic(t, b, scaling, y)
}

/// [`up_products`] eight outputs at a time: their rows' products in eight vectors (the rank is
/// short: 8-64), summed across lanes together by a tree of `vhaddps` instead of one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn up_products_avx2<L: Element, Y: Element>(t: &[f32], b: &[L], scaling: f32, y: &mut [Y]) {
    use std::arch::x86_64::*;
    let r = t.len();
    let whole = r / 8 * 8;
    let blocks = y.len() / 8 * 8;
    let mut sums = [0f32; 8];
    for o in (0..blocks).step_by(8) {
        let v: [__m256; 8] = std::array::from_fn(|l| {
            let row = &b[(o + l) * r..(o + l + 1) * r];
            let mut acc = _mm256_setzero_ps();
            for j in (0..whole).step_by(8) {
                // SAFETY: j + 8 <= whole <= r, the length of both rows.
                acc = unsafe { _mm256_fmadd_ps(load8(row.as_ptr().add(j)), _mm256_loadu_ps(t.as_ptr().add(j)), acc) };
            }
            acc
        });
        // hadd(hadd(v0, v1), hadd(v2, v3)) holds v0..v3's sums of lanes 0-3 in its low half and
        // of lanes 4-7 in its high half; the same for v4..v7; the halves then add up.
        let low = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let high = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        let total = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(low, high), _mm256_permute2f128_ps::<0x31>(low, high));
        if whole == r && Y::DTYPE != DType::F16 && L::DTYPE != DType::F16 {
            add_shares8::<L, Y>(&mut y[o..o + 8], total, scaling);
            continue;
        }
        _mm256_storeu_ps(sums.as_mut_ptr(), total);
        for (l, (yo, sum)) in y[o..o + 8].iter_mut().zip(sums).enumerate() {
            let row = &b[(o + l) * r..(o + l + 1) * r];
            let dot = row[whole..].iter().zip(&t[whole..]).fold(sum, |d, (bv, tv)| bv.to_f32().mul_add(*tv, d));
            add_share::<L, Y>(yo, dot, scaling);
        }
    }
    up_products_generic(t, &b[blocks * r..], scaling, &mut y[blocks..])
}

/// Eight elements of `L` from `p` as float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<L: Element>(p: *const L) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match L::DTYPE {
        DType::F32 => _mm256_loadu_ps(p as *const f32),
        DType::BF16 => widen_bf16(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))),
        DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

/// Eight values rounded to bfloat16 when `L` is bfloat16 (float32: as they are).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round8<L: Element>(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    match L::DTYPE {
        DType::F32 => v,
        DType::BF16 => widen_bf16(bf16_bits(v)),
        DType::F16 => unreachable!("float16 adapters round one by one"),
    }
}

/// [`add_share`] of eight outputs at once, float32 or bfloat16 (rounded as `half` rounds), for
/// float32 or bfloat16 adapters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_shares8<L: Element, Y: Element>(y: &mut [Y], sums: std::arch::x86_64::__m256, scaling: f32) {
    use std::arch::x86_64::*;
    debug_assert!(y.len() == 8);
    let share = round8::<L>(_mm256_mul_ps(round8::<L>(sums), _mm256_set1_ps(scaling)));
    match Y::DTYPE {
        DType::F32 => {
            let p = y.as_mut_ptr() as *mut f32;
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), share));
        }
        DType::BF16 => {
            let p = y.as_mut_ptr() as *mut __m128i;
            let lora = widen_bf16(bf16_bits(share));
            let sum = _mm256_add_ps(widen_bf16(_mm256_cvtepu16_epi32(_mm_loadu_si128(p))), lora);
            // packus leaves each 128-bit half's four values in its low 8 bytes; gather those two.
            let packed = _mm256_packus_epi32(bf16_bits(sum), _mm256_setzero_si256());
            _mm_storeu_si128(p, _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b00_00_10_00>(packed)));
        }
        DType::F16 => unreachable!("float16 outputs round one by one"),
    }
}

/// bfloat16 bits in the low 16 bits of each lane, as float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_bf16(bits: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
}

#[inline(always)]
fn up_products_generic<L: Element, Y: Element>(t: &[f32], b: &[L], scaling: f32, y: &mut [Y]) {
    for (yo, bo) in y.iter_mut().zip(b.chunks_exact(t.len())) {
        add_share::<L, Y>(yo, dot(bo, t), scaling);
    }
}

/// `y = round_y(y + round_y(round_L(round_L(share) * scaling)))`: the product rounded to the
/// adapters' dtype, scaled in float32 and rounded again, then to y's dtype, then the sum rounded
/// (`linear`, `mul_`, `to`, `add_` in PyTorch).
#[inline(always)]
fn add_share<L: Element, Y: Element>(y: &mut Y, share: f32, scaling: f32) {
    let lora = Y::from_f32(round::<L>(round::<L>(share) * scaling));
    *y = Y::from_f32(y.to_f32() + lora.to_f32());
}

/// A float32 dot product in 32 lanes (four vectors, where the caller enables them, so that
/// four chains of fused multiply-adds run at once).
#[inline(always)]
fn dot<L: Element>(a: &[L], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 32];
    let (mut ac, mut bc) = (a.chunks_exact(32), b.chunks_exact(32));
    for (av, bv) in (&mut ac).zip(&mut bc) {
        for l in 0..32 {
            lanes[l] = av[l].to_f32().mul_add(bv[l], lanes[l]);
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (av, bv) in ac.remainder().iter().zip(bc.remainder()) {
        sum = av.to_f32().mul_add(*bv, sum);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn lora_add_matches_float64_for_every_level_and_size() {
        let mut seed = 3u64;
        // Small (one thread), odd sizes (remainders), and large enough to share among threads.
        for &(rows, k, r, n) in &[(1, 576, 16, 576), (3, 37, 5, 70), (2, 4096, 64, 1100), (1, 8, 1, 1)] {
            let shape = LoraShape { rows, in_features: k, rank: r, out_features: n };
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            let a: Vec<f32> = (0..r * k).map(|_| lcg(&mut seed) * 0.1).collect();
            let b: Vec<f32> = (0..n * r).map(|_| lcg(&mut seed) * 0.1).collect();
            let y0: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed)).collect();
            let scaling = 32.0 / 12.0;
            for isa in Isa::available() {
                let mut y = y0.clone();
                lora_add(FloatSlice::F32(&x), FloatSlice::F32(&a), FloatSlice::F32(&b), scaling, shape, FloatSliceMut::F32(&mut y), isa, Host::Native).unwrap();
                for row in 0..rows {
                    let t: Vec<f64> =
                        (0..r).map(|j| (0..k).map(|i| a[j * k + i] as f64 * x[row * k + i] as f64).sum()).collect();
                    for o in 0..n {
                        let u: f64 = (0..r).map(|j| b[o * r + j] as f64 * t[j]).sum();
                        let want = y0[row * n + o] as f64 + u * scaling as f64;
                        let got = y[row * n + o] as f64;
                        let bound = 1e-5 * (1.0 + want.abs() + u.abs() * scaling as f64);
                        assert!((got - want).abs() < bound, "{shape:?} {isa:?} row {row} out {o}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_output_rounds_the_share_then_the_sum() {
        // y = 1.0 in bf16 (a unit in the last place: 2^-7). A share of 2^-8 (1 + 2^-10) rounds to
        // 2^-8 in bf16, and 1 + 2^-8, a tie, to 1.0 (even), where adding the float32 share would
        // round up to 1 + 2^-7. A share of 2^-8 (1 + 2^-7) is a bf16 value and rounds up either way.
        // Eight outputs of rank 8 take the vector path on x86 (of rank 1, the one-by-one path).
        for (rank, out) in [(1, 1), (8, 8), (8, 9)] {
            let shape = LoraShape { rows: 1, in_features: 1, rank, out_features: out };
            for (share, want) in [(2f32.powi(-8) * (1.0 + 2f32.powi(-10)), 1.0), (2f32.powi(-8) * (1.0 + 2f32.powi(-7)), 1.0 + 2f32.powi(-7))] {
                // t = [share, 0, ...]; every row of B is [1, 0, ...].
                let a: Vec<f32> = (0..rank).map(|j| if j == 0 { share } else { 0.0 }).collect();
                let b: Vec<f32> = (0..out * rank).map(|i| if i % rank == 0 { 1.0 } else { 0.0 }).collect();
                for isa in Isa::available() {
                    let mut y = vec![bf16::from_f32(1.0); out];
                    lora_add(FloatSlice::F32(&[1.0]), FloatSlice::F32(&a), FloatSlice::F32(&b), 1.0, shape, FloatSliceMut::BF16(&mut y), isa, Host::Native).unwrap();
                    assert!(y.iter().all(|v| *v == bf16::from_f32(want)), "{isa:?} rank {rank} share {share}: {y:?}");
                }
            }
        }
    }

    #[test]
    fn bf16_adapters_round_each_step_as_the_ops_do() {
        // Rank 1 (one by one) and rank 8 (eight outputs at once on x86; the first of t alone counts).
        let first = |rank: usize, v: f32| -> Vec<bf16> { (0..rank).map(|j| bf16::from_f32(if j == 0 { v } else { 0.0 })).collect() };
        for rank in [1, 8] {
            let shape = LoraShape { rows: 1, in_features: 1, rank, out_features: 8 };
            // x = 1 + 2^-8 rounds to 1.0 in bf16 (a tie, to even) before the products: t = 3, and
            // y = 3 * 0.5 * 2 = 3; unrounded, t = 3 + 3 * 2^-8 would round up to 3 + 2^-6.
            let (a, b) = (first(rank, 3.0), (0..8).flat_map(|_| first(rank, 0.5)).collect::<Vec<_>>());
            for isa in Isa::available() {
                let mut y = vec![0f32; 8];
                let x = [1.0 + 2f32.powi(-8)];
                lora_add(FloatSlice::F32(&x), FloatSlice::BF16(&a), FloatSlice::BF16(&b), 2.0, shape, FloatSliceMut::F32(&mut y), isa, Host::Native)
                    .unwrap();
                assert!(y.iter().all(|v| *v == 3.0), "{isa:?} rank {rank}: {y:?}");
            }
            // u = 1.5 (1 + 2^-7) is no bf16 value: it rounds before the scaling, the scaled share again.
            let (a, b) = (first(rank, 1.0 + 2f32.powi(-7)), (0..8).flat_map(|_| first(rank, 1.5)).collect::<Vec<_>>());
            let want = bf16::from_f32(bf16::from_f32(1.5 * (1.0 + 2f32.powi(-7))).to_f32() * 3.0).to_f32();
            assert_ne!(want, bf16::from_f32(1.5 * (1.0 + 2f32.powi(-7)) * 3.0).to_f32());
            for isa in Isa::available() {
                let mut y = vec![0f32; 8];
                lora_add(FloatSlice::F32(&[1.0]), FloatSlice::BF16(&a), FloatSlice::BF16(&b), 3.0, shape, FloatSliceMut::F32(&mut y), isa, Host::Native)
                    .unwrap();
                assert!(y.iter().all(|v| *v == want), "{isa:?} rank {rank}: {y:?} vs {want}");
            }
        }
    }

    #[test]
    fn lora_add_names_wrong_sizes() {
        let shape = LoraShape { rows: 2, in_features: 4, rank: 2, out_features: 3 };
        let mut y = [0f32; 6];
        let err = lora_add(FloatSlice::F32(&[0.0; 8]), FloatSlice::F32(&[0.0; 7]), FloatSlice::F32(&[0.0; 6]), 1.0, shape, FloatSliceMut::F32(&mut y), Isa::Portable, Host::Native)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora_A has 7 elements") && err.contains("needs 8"), "{err}");
    }
}
