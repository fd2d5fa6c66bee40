//! The inner loops of calibration, compiled once per instruction-set level.
//!
//! Every multiply-add is a fused one (`mul_add`) wherever the CPU has FMA, so AVX2 and AVX-512
//! machines compute bit-identical results (an FMA rounds once whatever the vector width); the
//! loops are plain Rust over slices and fixed-size lane arrays, which the compiler vectorises
//! under each level's target features. Without FMA (the portable build on an old x86-64) the
//! same loops multiply and add separately: deterministic on that machine, not bitwise equal to
//! the fused result.

use crate::cpu_isa::Isa;

/// The level the calibration kernels run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// AVX-512 F + FMA (16 float32 lanes).
    Avx512,
    /// AVX2 + FMA (8 float32 lanes).
    Avx2,
    /// Whatever the baseline target gives; fused only where the baseline has FMA.
    Portable,
}

impl Fused {
    /// The widest level this CPU runs, capped by `QLORA_RS_CPU_ISA` like the other CPU kernels.
    pub fn detect() -> Fused {
        match Isa::current().unwrap_or(Isa::Portable) {
            Isa::Avx512 | Isa::Avx512Bf16 => Fused::Avx512,
            Isa::Avx2 => Fused::Avx2,
            Isa::Portable => Fused::Portable,
        }
    }
}

/// Whether the portable build has a hardware FMA (then `mul_add` is one instruction).
pub const PORTABLE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// `a * b + c`, rounded once when `FMA`.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
pub fn madd64<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Defines `pub fn $name(fused: Fused, args...)` that runs `$generic::<FMA>(args...)` compiled for
/// the given level (the generic function and what it calls must be `#[inline(always)]`).
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:ident) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(fused: $crate::calibrate::kernels::Fused, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                $generic::<true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $generic::<true>($($arg),*)
            }
            match fused {
                // SAFETY: `Fused::detect` returns these levels only where the CPU has them.
                #[cfg(target_arch = "x86_64")]
                $crate::calibrate::kernels::Fused::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::calibrate::kernels::Fused::Avx2 => unsafe { avx2($($arg),*) },
                _ => $generic::<{ $crate::calibrate::kernels::PORTABLE_FMA }>($($arg),*),
            }
        }
    };
}
pub(crate) use isa_dispatch;

isa_dispatch! {
    /// `c += alpha * a b` for row-major `a` (m x k), `b` (k x n), `c` (m x n), float64; each
    /// element of `c` sums over k in order.
    pub fn gemm_nn_f64(c: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize, alpha: f64) => gemm_nn_f64_generic
}

/// Rows and columns of `c` kept in registers by [`gemm_nn_f64_generic`].
const GEMM_ROWS: usize = 4;
const GEMM_COLS: usize = 16;

#[inline(always)]
fn gemm_nn_f64_generic<const FMA: bool>(c: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize, alpha: f64) {
    // 4 x 16 blocks of c accumulate in registers over all of k; the edges take the plain loop.
    // Both compute each element as the same chain of multiply-adds in p order.
    let (mb, nb) = (m / GEMM_ROWS * GEMM_ROWS, n / GEMM_COLS * GEMM_COLS);
    for r0 in (0..mb).step_by(GEMM_ROWS) {
        for j0 in (0..nb).step_by(GEMM_COLS) {
            let mut acc = [[0f64; GEMM_COLS]; GEMM_ROWS];
            for (rr, row) in acc.iter_mut().enumerate() {
                row.copy_from_slice(&c[(r0 + rr) * n + j0..(r0 + rr) * n + j0 + GEMM_COLS]);
            }
            for p in 0..k {
                let bv: &[f64; GEMM_COLS] = b[p * n + j0..p * n + j0 + GEMM_COLS].try_into().expect("block width");
                for (rr, row) in acc.iter_mut().enumerate() {
                    let s = alpha * a[(r0 + rr) * k + p];
                    for jj in 0..GEMM_COLS {
                        row[jj] = madd64::<FMA>(s, bv[jj], row[jj]);
                    }
                }
            }
            for (rr, row) in acc.iter().enumerate() {
                c[(r0 + rr) * n + j0..(r0 + rr) * n + j0 + GEMM_COLS].copy_from_slice(row);
            }
        }
    }
    for r in 0..mb {
        if nb < n {
            gemm_row::<FMA>(c, a, b, r, nb..n, k, n, alpha);
        }
    }
    for r in mb..m {
        gemm_row::<FMA>(c, a, b, r, 0..n, k, n, alpha);
    }
}

/// Columns `cols` of row `r` of [`gemm_nn_f64_generic`], one element at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_row<const FMA: bool>(c: &mut [f64], a: &[f64], b: &[f64], r: usize, cols: std::ops::Range<usize>, k: usize, n: usize, alpha: f64) {
    for p in 0..k {
        let s = alpha * a[r * k + p];
        for j in cols.clone() {
            c[r * n + j] = madd64::<FMA>(s, b[p * n + j], c[r * n + j]);
        }
    }
}
