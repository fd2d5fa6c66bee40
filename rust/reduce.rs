//! A float32 sum that reproduces PyTorch's CPU reduction order bit for bit.
//!
//! Double quantization subtracts `mean(absmax)` computed in float32; bitsandbytes computes it with
//! `torch.mean`, whose cascade summation (SIMD lanes, 4-way interleave, 4 levels of partial sums,
//! one chunk per thread above 32768 elements) rounds differently from an exact sum in about a
//! third of the tensors. Following the same order makes the offset, and so every nested code,
//! identical. Callers that have torch at hand take the offset from torch itself; this emulation
//! serves the paths without torch (`qlora-rs convert`).
//!
//! The order depends on the SIMD width of torch's float32 sum kernel and on its intra-op thread
//! count. On x86-64 the width is 8 lanes whatever the CPU: torch's sum gives the same bits with
//! `ATEN_CPU_CAPABILITY=avx2` and on AVX-512 (measured for 2,545 vectors and 1-8 threads, the
//! fixture `tests/data/torch_mean_f32.json`), so the width is not taken from the CPU's features.

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

/// float32 lanes of torch's CPU sum kernel on this architecture.
#[cfg(target_arch = "x86_64")]
pub const TORCH_SUM_WIDTH: usize = 8;
#[cfg(not(target_arch = "x86_64"))]
pub const TORCH_SUM_WIDTH: usize = 4;

impl SumOrder {
    /// The order of a default PyTorch process on this machine: torch's sum width and its default
    /// intra-op thread count (see [`torch_default_threads`]).
    pub fn detect() -> Self {
        SumOrder { vec_width: TORCH_SUM_WIDTH, threads: torch_default_threads() }
    }

    pub fn new(vec_width: usize, threads: usize) -> Self {
        SumOrder { vec_width: vec_width.clamp(1, MAX_WIDTH), threads: threads.max(1) }
    }
}

/// The intra-op thread count a fresh torch process would use: `QLORA_RS_TORCH_THREADS` (ours: the
/// `torch.get_num_threads()` of the run whose bytes should be matched), else `OMP_NUM_THREADS` or
/// `MKL_NUM_THREADS` as torch reads them, else the number of physical cores (torch's default), else
/// the CPUs this process may use.
pub fn torch_default_threads() -> usize {
    let from_env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    from_env("QLORA_RS_TORCH_THREADS")
        .or_else(|| from_env("OMP_NUM_THREADS"))
        .or_else(|| from_env("MKL_NUM_THREADS"))
        .or_else(physical_cores)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Physical cores (distinct package/core id pairs of the online CPUs), as torch counts them.
#[cfg(target_os = "linux")]
fn physical_cores() -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.strip_prefix("cpu").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let topo = entry.path().join("topology");
        let read = |f: &str| std::fs::read_to_string(topo.join(f)).ok().map(|s| s.trim().to_string());
        if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((pkg, core));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(not(target_os = "linux"))]
fn physical_cores() -> Option<usize> {
    None
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
