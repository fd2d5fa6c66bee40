//! A float32 sum that reproduces PyTorch's CPU reduction order bit for bit.
//!
//! Double quantization subtracts `mean(absmax)` computed in float32; bitsandbytes computes it with
//! `torch.mean`, whose cascade summation (SIMD lanes, 4-way interleave, 4 levels of partial sums,
//! one chunk per thread above 32768 elements) rounds differently from an exact sum in about a
//! third of the tensors. Following the same order makes the offset, and so every nested code,
//! identical. The order depends on the SIMD width torch uses (8 floats for AVX2, 16 for AVX-512)
//! and on its intra-op thread count, so both are parameters.

/// How PyTorch would sum: SIMD width in float32 lanes and intra-op threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumOrder {
    pub vec_width: usize,
    pub threads: usize,
}

/// PyTorch's `internal::GRAIN_SIZE`: below it a reduction runs on one thread.
const GRAIN_SIZE: usize = 32768;
const ILP: usize = 4;
const LEVELS: usize = 4;
const MAX_WIDTH: usize = 16;

impl SumOrder {
    /// The order of a default PyTorch build on this machine: AVX-512 width when the CPU has the
    /// instructions torch requires for it, else AVX2's; one thread per available CPU.
    /// `QLORA_RS_TORCH_THREADS` overrides the thread count (torch.get_num_threads() of the run
    /// whose bytes should be matched).
    pub fn detect() -> Self {
        let threads = std::env::var("QLORA_RS_TORCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        SumOrder { vec_width: detect_width(), threads }
    }

    pub fn new(vec_width: usize, threads: usize) -> Self {
        SumOrder { vec_width: vec_width.clamp(1, MAX_WIDTH), threads: threads.max(1) }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_width() -> usize {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
    {
        16
    } else {
        8
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_width() -> usize {
    4
}

/// `torch.sum` of a contiguous float32 vector.
pub fn torch_sum_f32(x: &[f32], order: SumOrder) -> f32 {
    let n = x.len();
    if n < GRAIN_SIZE || order.threads == 1 {
        return contiguous_sum(x, order.vec_width);
    }
    // Two-pass reduction: one contiguous chunk per thread, then the per-thread partials in order.
    let threads = order.threads.min(n.div_ceil(GRAIN_SIZE));
    let chunk = n.div_ceil(threads);
    x.chunks(chunk).map(|c| contiguous_sum(c, order.vec_width)).fold(0.0f32, |a, p| a + p)
}

/// `torch.mean` of a contiguous float32 vector: the sum divided by n in float32.
pub fn torch_mean_f32(x: &[f32], order: SumOrder) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    torch_sum_f32(x, order) / x.len() as f32
}

type Lanes = [f32; MAX_WIDTH];

fn add(a: &mut Lanes, b: &Lanes, w: usize) {
    for k in 0..w {
        a[k] += b[k];
    }
}

/// One thread's inner-contiguous sum: SIMD lanes over whole vectors, a scalar tail, then the lanes.
fn contiguous_sum(x: &[f32], w: usize) -> f32 {
    if x.len() < w {
        // Scalar path: four interleaved accumulators are all still zero for fewer than four
        // elements; beyond that torch's scalar row sum uses the same cascade with width 1.
        return contiguous_sum_scalar(x);
    }
    let vec_numel = x.len() / w;
    let lanes = row_sum(x, w, vec_numel);
    let mut acc = 0f32;
    for &v in &x[vec_numel * w..] {
        acc += v;
    }
    for &l in &lanes[..w] {
        acc += l;
    }
    acc
}

fn contiguous_sum_scalar(x: &[f32]) -> f32 {
    let lanes = row_sum(x, 1, x.len());
    lanes[0]
}

/// Sum of `vec_numel` vectors of width `w`, read as rows of ILP vectors each.
fn row_sum(x: &[f32], w: usize, vec_numel: usize) -> Lanes {
    let load = |i: usize| -> Lanes {
        let mut v = [0f32; MAX_WIDTH];
        v[..w].copy_from_slice(&x[i * w..(i + 1) * w]);
        v
    };
    let size_ilp = vec_numel / ILP;
    let mut partial = multi_row_sum(size_ilp, w, |row, k| load(row * ILP + k));
    for i in size_ilp * ILP..vec_numel {
        add(&mut partial[0], &load(i), w);
    }
    let mut total = partial[0];
    for p in &partial[1..] {
        add(&mut total, p, w);
    }
    total
}

/// PyTorch's `multi_row_sum`: ILP accumulators cascaded through four levels of partial sums.
// The index loops spell out torch's accumulator order (level j, lane k) one to one.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum(size: usize, w: usize, load: impl Fn(usize, usize) -> Lanes) -> [Lanes; ILP] {
    let ceil_log2 = if size <= 1 { 0 } else { usize::BITS - (size - 1).leading_zeros() } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; MAX_WIDTH]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], &load(i, k), w);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower, w);
                acc[j - 1][k] = [0f32; MAX_WIDTH];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ILP {
            add(&mut acc[0][k], &load(i, k), w);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper, w);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sums_are_exact_for_integers() {
        for n in [0usize, 1, 3, 7, 8, 9, 31, 100, 1000, 40000, 100_000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            for w in [1, 4, 8, 16] {
                for t in [1, 2, 16] {
                    assert_eq!(torch_sum_f32(&x, SumOrder::new(w, t)) as f64, want, "n={n} w={w} t={t}");
                }
            }
        }
    }

    #[test]
    fn mean_of_empty_is_zero() {
        assert_eq!(torch_mean_f32(&[], SumOrder::new(8, 2)), 0.0);
    }
}
