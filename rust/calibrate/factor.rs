//! The factor the column sweep runs on: `U`, upper triangular with `Uᵀ U = (H + λI)⁻¹`, from a
//! layer's input second moment `H = XᵀX` (float64).
//!
//! With `J` the reversal permutation, `J (H + λI) J = L Lᵀ` (lower Cholesky) gives
//! `H + λI = (J L J)(J L J)ᵀ` with `J L J` upper triangular, hence `(H + λI)⁻¹ = Uᵀ U` with
//! `U = J L⁻¹ J`: one Cholesky and one triangular inverse, no general inverse and no second
//! factorisation. Both run on 64 x 64 tiles (rayon over independent tiles) in float64 with a fixed
//! operation order, so the result does not depend on the thread count.
//!
//! Row `j` of `U` is what the sweep needs at column `j`: `U[j, j]²` is the variance of the
//! compensated error of column `j` given the columns after it, and `U[j, j+1..] / U[j, j]` is how
//! the error of column `j` is spread over them (GPTQ's update).

use rayon::prelude::*;

use super::kernels::{gemm_nn_f64, Fused};
use crate::error::{Error, Result};

/// Damping added to the diagonal, relative to the mean of the diagonal (GPTQ's `percdamp`).
pub const DEFAULT_DAMP: f64 = 0.01;

/// Times the damping is multiplied by 10 when the damped matrix is still not positive definite
/// (rounding in a nearly singular `XᵀX`).
const DAMP_RETRIES: u32 = 6;

const TILE: usize = 64;

/// `U` (see the module docs) for one layer input, shared by every linear layer reading that input.
#[derive(Clone, Debug)]
pub struct HessianFactor {
    n: usize,
    /// Row-major n x n, zero below the diagonal.
    u: Vec<f32>,
    /// The damping λ added to the diagonal (absolute).
    pub damp: f64,
    /// Columns whose input was zero on every calibration token (diagonal 0): they quantize to
    /// nearest and take no error from the others.
    pub dead_columns: usize,
    /// How many times the damping had to be raised tenfold to make the matrix positive definite.
    pub damp_raised: u32,
}

impl HessianFactor {
    /// Factors `H + λI` with `λ = relative_damp * mean(diag H)`. `h` is row-major n x n and
    /// symmetric (only its lower triangle is read). An `H` that is all zero (no signal at all)
    /// gives the identity: every weight then counts alike, as in round-to-nearest.
    pub fn new(h: &[f64], n: usize, relative_damp: f64) -> Result<HessianFactor> {
        if h.len() != n * n || n == 0 {
            return Err(Error::shape(format!("the Hessian has {} entries; a {n} x {n} matrix has {}", h.len(), n * n)));
        }
        if !(relative_damp.is_finite() && relative_damp > 0.0) {
            return Err(Error::unsupported(format!("damping must be a positive number, got {relative_damp}")));
        }
        if let Some(i) = h.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "the Hessian (XᵀX of the calibration inputs)".into(), index: i, value: h[i] as f32 });
        }
        let diag: Vec<f64> = (0..n).map(|i| h[i * n + i]).collect();
        if let Some(i) = diag.iter().position(|&d| d < 0.0) {
            return Err(Error::unsupported(format!(
                "the Hessian has a negative diagonal entry {} at {i}: XᵀX has none, so it is not a second moment",
                diag[i]
            )));
        }
        let dead_columns = diag.iter().filter(|&&d| d == 0.0).count();
        let mean = diag.iter().sum::<f64>() / n as f64;
        if mean == 0.0 {
            return Ok(HessianFactor::identity(n));
        }
        let mut damp = relative_damp * mean;
        for attempt in 0..=DAMP_RETRIES {
            // J (H + λI) J, lower triangle, in tiles.
            let mut a = Tiles::from_fn(n, |i, j| {
                let (si, sj) = (n - 1 - i, n - 1 - j);
                h[si * n + sj] + if i == j { damp } else { 0.0 }
            });
            if cholesky(&mut a).is_ok() {
                let m = lower_inverse(&a);
                let mut u = vec![0f32; n * n];
                u.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                    for (j, v) in row.iter_mut().enumerate().skip(i) {
                        *v = m.get(n - 1 - i, n - 1 - j) as f32;
                    }
                });
                return Ok(HessianFactor { n, u, damp, dead_columns, damp_raised: attempt });
            }
            damp *= 10.0;
        }
        Err(Error::unsupported(format!(
            "the {n} x {n} Hessian stays singular with damping up to {damp:e} (the calibration inputs are degenerate)"
        )))
    }

    /// The factor of an identity Hessian: no compensation, every column weighted alike.
    pub fn identity(n: usize) -> HessianFactor {
        let mut u = vec![0f32; n * n];
        for i in 0..n {
            u[i * n + i] = 1.0;
        }
        HessianFactor { n, u, damp: 0.0, dead_columns: n, damp_raised: 0 }
    }

    /// Columns (the layer's input features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `U`, row-major n x n (zero below the diagonal).
    pub fn upper(&self) -> &[f32] {
        &self.u
    }

    /// Builds a factor from a given upper-triangular `U` (row-major; its lower part is ignored).
    pub fn from_upper(u: &[f32], n: usize) -> Result<HessianFactor> {
        if u.len() != n * n || n == 0 {
            return Err(Error::shape(format!("U has {} entries; a {n} x {n} matrix has {}", u.len(), n * n)));
        }
        let mut own = u.to_vec();
        for i in 0..n {
            let d = own[i * n + i];
            if !(d.is_finite() && d > 0.0) {
                return Err(Error::unsupported(format!("U[{i}, {i}] is {d}; a Cholesky factor has a positive diagonal")));
            }
            own[i * n..i * n + i].fill(0.0);
        }
        if let Some(i) = own.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "U".into(), index: i, value: own[i] });
        }
        Ok(HessianFactor { n, u: own, damp: 0.0, dead_columns: 0, damp_raised: 0 })
    }
}

/// The lower triangle of an n x n matrix as square tiles: tile (i, j), i >= j, is row-major
/// `size(i) x size(j)`.
struct Tiles {
    n: usize,
    count: usize,
    tiles: Vec<Vec<f64>>,
}

impl Tiles {
    fn from_fn(n: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> Tiles {
        let count = n.div_ceil(TILE);
        let tiles = (0..count * (count + 1) / 2)
            .into_par_iter()
            .map(|t| {
                let (ti, tj) = tile_of(t);
                let (ri, rj) = (size(n, ti), size(n, tj));
                let mut v = vec![0f64; ri * rj];
                for r in 0..ri {
                    for c in 0..rj {
                        let (i, j) = (ti * TILE + r, tj * TILE + c);
                        if i >= j {
                            v[r * rj + c] = f(i, j);
                        }
                    }
                }
                v
            })
            .collect();
        Tiles { n, count, tiles }
    }

    fn get(&self, i: usize, j: usize) -> f64 {
        let (ti, tj) = (i / TILE, j / TILE);
        self.tiles[index(ti, tj)][(i % TILE) * size(self.n, tj) + j % TILE]
    }
}

fn index(ti: usize, tj: usize) -> usize {
    ti * (ti + 1) / 2 + tj
}

fn tile_of(t: usize) -> (usize, usize) {
    // Largest ti with ti (ti + 1) / 2 <= t.
    let mut ti = (((8 * t + 1) as f64).sqrt() as usize).saturating_sub(1) / 2;
    while (ti + 1) * (ti + 2) / 2 <= t {
        ti += 1;
    }
    while ti * (ti + 1) / 2 > t {
        ti -= 1;
    }
    (ti, t - ti * (ti + 1) / 2)
}

fn size(n: usize, t: usize) -> usize {
    TILE.min(n - t * TILE)
}

struct NotPositiveDefinite;

/// Right-looking tiled Cholesky in place (lower factor).
fn cholesky(a: &mut Tiles) -> std::result::Result<(), NotPositiveDefinite> {
    let (n, count) = (a.n, a.count);
    for k in 0..count {
        let sk = size(n, k);
        let diag = &mut a.tiles[index(k, k)];
        cholesky_tile(diag, sk)?;
        let inv_t = transpose(&lower_inverse_tile(diag, sk), sk, sk);
        // Panel: A(i, k) <- A(i, k) L(k, k)⁻ᵀ.
        let panel: Vec<(usize, Vec<f64>)> = (k + 1..count)
            .into_par_iter()
            .map(|i| {
                let si = size(n, i);
                let mut out = vec![0f64; si * sk];
                gemm(&mut out, &a.tiles[index(i, k)], &inv_t, si, sk, sk, 1.0);
                (i, out)
            })
            .collect();
        for (i, t) in &panel {
            a.tiles[index(*i, k)].clone_from(t);
        }
        // Trailing update: A(i, j) -= A(i, k) A(j, k)ᵀ for k < j <= i.
        let panel_t: Vec<Vec<f64>> = panel.iter().map(|(i, t)| transpose(t, size(n, *i), sk)).collect();
        a.tiles.par_iter_mut().enumerate().for_each(|(t, tile)| {
            let (i, j) = tile_of(t);
            if j > k {
                let (si, sj) = (size(n, i), size(n, j));
                gemm(tile, &panel[i - k - 1].1, &panel_t[j - k - 1], si, sk, sj, -1.0);
            }
        });
    }
    Ok(())
}

/// `L⁻¹` of a tiled lower Cholesky factor, by column panels (independent, in parallel):
/// `M(k, k) = L(k, k)⁻¹`, `M(i, k) = -L(i, i)⁻¹ Σ_{k<=m<i} L(i, m) M(m, k)`.
#[allow(clippy::needless_range_loop)] // i names a tile row: sizes, tile indices and diag_inv
fn lower_inverse(l: &Tiles) -> Tiles {
    let (n, count) = (l.n, l.count);
    let diag_inv: Vec<Vec<f64>> =
        (0..count).into_par_iter().map(|i| lower_inverse_tile(&l.tiles[index(i, i)], size(n, i))).collect();
    let columns: Vec<Vec<Vec<f64>>> = (0..count)
        .into_par_iter()
        .map(|k| {
            let sk = size(n, k);
            let mut col: Vec<Vec<f64>> = vec![diag_inv[k].clone()];
            for i in k + 1..count {
                let si = size(n, i);
                let mut sum = vec![0f64; si * sk];
                for m in k..i {
                    gemm(&mut sum, &l.tiles[index(i, m)], &col[m - k], si, size(n, m), sk, 1.0);
                }
                let mut out = vec![0f64; si * sk];
                gemm(&mut out, &diag_inv[i], &sum, si, si, sk, -1.0);
                col.push(out);
            }
            col
        })
        .collect();
    let mut tiles = vec![Vec::new(); count * (count + 1) / 2];
    for (k, col) in columns.into_iter().enumerate() {
        for (d, t) in col.into_iter().enumerate() {
            tiles[index(k + d, k)] = t;
        }
    }
    Tiles { n, count, tiles }
}

/// Unblocked Cholesky of one diagonal tile (lower, in place; the upper part is zeroed).
fn cholesky_tile(a: &mut [f64], s: usize) -> std::result::Result<(), NotPositiveDefinite> {
    for j in 0..s {
        let mut d = a[j * s + j];
        for m in 0..j {
            d -= a[j * s + m] * a[j * s + m];
        }
        if !(d > 0.0 && d.is_finite()) {
            return Err(NotPositiveDefinite);
        }
        let d = d.sqrt();
        a[j * s + j] = d;
        for i in j + 1..s {
            let mut v = a[i * s + j];
            for m in 0..j {
                v -= a[i * s + m] * a[j * s + m];
            }
            a[i * s + j] = v / d;
        }
        for c in j + 1..s {
            a[j * s + c] = 0.0;
        }
    }
    Ok(())
}

/// Inverse of a lower-triangular tile (column by column, forward substitution).
fn lower_inverse_tile(l: &[f64], s: usize) -> Vec<f64> {
    let mut x = vec![0f64; s * s];
    for c in 0..s {
        x[c * s + c] = 1.0 / l[c * s + c];
        for i in c + 1..s {
            let mut v = 0.0;
            for m in c..i {
                v += l[i * s + m] * x[m * s + c];
            }
            x[i * s + c] = -v / l[i * s + i];
        }
    }
    x
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// `c += alpha * a b` (a: m x k, b: k x n, all row-major).
fn gemm(c: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize, alpha: f64) {
    gemm_nn_f64(Fused::detect(), c, a, b, m, k, n, alpha);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_spd(n: usize, seed: u64) -> Vec<f64> {
        // X with more rows than columns, correlated columns: H = XᵀX.
        let rows = n + 7;
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let x: Vec<f64> = (0..rows * n).map(|_| next()).collect();
        let mut h = vec![0f64; n * n];
        for r in 0..rows {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += (x[r * n + i] + 0.3 * x[r * n + (i + 1) % n]) * (x[r * n + j] + 0.3 * x[r * n + (j + 1) % n]);
                }
            }
        }
        h
    }

    #[test]
    fn tile_indexing_round_trips() {
        for t in 0..5000 {
            let (i, j) = tile_of(t);
            assert!(j <= i);
            assert_eq!(index(i, j), t);
        }
    }

    #[test]
    fn u_transpose_u_is_the_damped_inverse() {
        for n in [1, 5, 63, 64, 65, 130, 200] {
            let h = random_spd(n, n as u64 + 3);
            let f = HessianFactor::new(&h, n, 0.01).unwrap();
            let u = f.upper();
            // (H + λI) Uᵀ U = I.
            let mut hd = h.clone();
            for i in 0..n {
                hd[i * n + i] += f.damp;
            }
            let mut utu = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    utu[i * n + j] = (0..=i.min(j)).map(|k| u[k * n + i] as f64 * u[k * n + j] as f64).sum();
                }
            }
            let mut worst = 0f64;
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| hd[i * n + k] * utu[k * n + j]).sum();
                    worst = worst.max((v - if i == j { 1.0 } else { 0.0 }).abs());
                }
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0);
                }
                assert!(u[i * n + i] > 0.0);
            }
            assert!(worst < 1e-3, "n = {n}: max |(H + λI) UᵀU - I| = {worst}");
        }
    }

    #[test]
    fn degenerate_inputs() {
        // All zero: identity.
        let f = HessianFactor::new(&[0.0; 9], 3, 0.01).unwrap();
        assert_eq!(f.upper(), &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        // A dead column is decoupled: its row of U has nothing off the diagonal.
        let mut h = random_spd(6, 9);
        for k in 0..6 {
            h[2 * 6 + k] = 0.0;
            h[k * 6 + 2] = 0.0;
        }
        let f = HessianFactor::new(&h, 6, 0.01).unwrap();
        assert_eq!(f.dead_columns, 1);
        for k in 3..6 {
            assert!(f.upper()[2 * 6 + k].abs() < 1e-6);
        }
        assert!(HessianFactor::new(&[1.0, f64::NAN, 0.0, 1.0], 2, 0.01).unwrap_err().to_string().contains("non-finite"));
        assert!(HessianFactor::new(&[1.0; 3], 2, 0.01).is_err());
        assert!(HessianFactor::new(&[-1.0, 0.0, 0.0, 1.0], 2, 0.01).unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn rank_deficient_gets_more_damping_or_works() {
        // Rank 1: x xᵀ; damping makes it positive definite.
        let n = 70;
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let h: Vec<f64> = (0..n * n).map(|k| x[k / n] * x[k % n]).collect();
        let f = HessianFactor::new(&h, n, 0.01).unwrap();
        assert!(f.upper().iter().all(|v| v.is_finite()));
    }
}
