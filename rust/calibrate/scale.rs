//! The choice of one block's scale: the signed float that minimises the weighted squared error of
//! the block's weights rounded to the nearest code at that scale.
//!
//! bitsandbytes decodes `code[q] * absmax`; nothing requires `absmax` to be the block's largest
//! magnitude, nor positive. A scale a little below the largest magnitude clips the outlier and
//! refines every other weight; a negative scale mirrors the code table, which matters for NF4:
//! its table is asymmetric (8 positive levels up to 1.0, 7 negative down to -1.0), so a negative
//! scale gives the finer half to the block's negative side. Symmetric tables (FP4, INT4) gain
//! nothing from the sign and search positive scales only.
//!
//! Candidates, per sign: without double quantization, `|s| = r * max|x|` for r in 0.66 ..= 1.14
//! (steps of 0.01, r = 1 always among them); with it, the scales double quantization can decode
//! for the block's group of 256 (`map[q] * nested_absmax + offset`) whose magnitude lies in the same
//! range, plus the one nearest to `max|x|`. Long candidate lists are searched coarse to fine.

use super::kernels::madd;
use crate::quant4::QuantType;

/// Smallest and largest candidate scale magnitude, relative to the block's largest magnitude.
pub const RATIO_LO: f32 = 0.66;
pub const RATIO_HI: f32 = 1.14;
/// Free candidates: ratios (66 + k) / 100 for k = 0 ..= FREE_STEPS.
const FREE_STEPS: usize = 48;
/// k of the ratio 1.0 (the round-to-nearest scale).
const FREE_ONE: usize = 34;
/// Lists longer than this are searched coarse to fine.
const EXHAUSTIVE: usize = 16;
const COARSE_POINTS: usize = 12;
const LANES: usize = 16;

/// A 4-bit code table sorted by value, with the midpoints that round to it.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub mids: [f32; 15],
    pub sorted: [f32; 16],
    /// Nibble of each sorted position.
    pub nibble: [u8; 16],
    /// Nibble that decodes to 0.0 (what an all-zero block and an odd tail store).
    pub zero_nibble: u8,
    /// The table equals its own negation (FP4, INT4): negative scales add nothing.
    pub symmetric: bool,
}

impl Grid {
    pub fn new(quant_type: QuantType) -> Grid {
        let enc = quant_type.encoder();
        let code = quant_type.code();
        let sorted: [f32; 16] = std::array::from_fn(|r| code[enc.nibble_of_rank[r] as usize]);
        let symmetric = (0..16).all(|r| sorted[r] == -sorted[15 - r]);
        Grid { mids: enc.midpoints, sorted, nibble: enc.nibble_of_rank, zero_nibble: enc.encode(0.0), symmetric }
    }

    /// Sorted position of the code nearest to `y` (ties to the lower code).
    #[inline(always)]
    pub fn rank(&self, y: f32) -> usize {
        let mut r = 0;
        for &m in &self.mids {
            r += (y > m) as usize;
        }
        r
    }

    /// The code value nearest to `y`, by selects (vectorises without a gather).
    #[inline(always)]
    fn nearest(&self, y: f32) -> f32 {
        let mut v = self.sorted[0];
        for k in 0..15 {
            v = if y > self.mids[k] { self.sorted[k + 1] } else { v };
        }
        v
    }
}

/// `Σ d_j (x_j - s * code(x_j / s))²`: the weighted error of the block at scale `s` (s != 0).
#[inline(always)]
pub fn block_error<const FMA: bool>(grid: &Grid, x: &[f32], d: &[f32], s: f32) -> f32 {
    let inv = 1.0 / s;
    let mut acc = [0f32; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut ds = d.chunks_exact(LANES);
    for (xc, dc) in (&mut xs).zip(&mut ds) {
        for l in 0..LANES {
            let e = xc[l] - grid.nearest(xc[l] * inv) * s;
            acc[l] = madd::<FMA>(dc[l] * e, e, acc[l]);
        }
    }
    for (l, (&xv, &dv)) in xs.remainder().iter().zip(ds.remainder()).enumerate() {
        let e = xv - grid.nearest(xv * inv) * s;
        acc[l] = madd::<FMA>(dv * e, e, acc[l]);
    }
    // A fixed pairwise order: the same sum whatever the vector width.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut m = 0f32;
    for v in x {
        m = m.max(v.abs());
    }
    m
}

/// Candidate scales of one block, by index (no closures: the search is inlined into the
/// caller's instruction-set level, which closures would not inherit).
trait Candidates {
    fn error<const FMA: bool>(&self, i: usize) -> f32;
}

struct FreeCandidates<'a> {
    grid: &'a Grid,
    x: &'a [f32],
    d: &'a [f32],
    /// The block's largest magnitude, with the sign searched.
    signed_amax: f32,
}

impl FreeCandidates<'_> {
    #[inline(always)]
    fn scale(&self, k: usize) -> f32 {
        self.signed_amax * ((66 + k) as f32 / 100.0)
    }
}

impl Candidates for FreeCandidates<'_> {
    #[inline(always)]
    fn error<const FMA: bool>(&self, k: usize) -> f32 {
        block_error::<FMA>(self.grid, self.x, self.d, self.scale(k))
    }
}

struct TableCandidates<'a> {
    grid: &'a Grid,
    x: &'a [f32],
    d: &'a [f32],
    table: &'a [f32; 256],
}

impl Candidates for TableCandidates<'_> {
    #[inline(always)]
    fn error<const FMA: bool>(&self, q: usize) -> f32 {
        let s = self.table[q];
        if s == 0.0 {
            f32::INFINITY
        } else {
            block_error::<FMA>(self.grid, self.x, self.d, s)
        }
    }
}

/// The index in `lo..=hi` with the least error (the first on ties): every index of a short list,
/// else every `stride`-th and then the neighbours of the best. `first` is evaluated beforehand
/// (a candidate that must always be considered) and wins ties.
#[inline(always)]
fn search<C: Candidates, const FMA: bool>(c: &C, lo: usize, hi: usize, first: Option<usize>) -> (usize, f32) {
    let mut best = (usize::MAX, f32::INFINITY);
    if let Some(f) = first {
        consider::<C, FMA>(c, f, &mut best);
    }
    if lo > hi {
        return best;
    }
    let count = hi - lo + 1;
    if count <= EXHAUSTIVE {
        for i in lo..=hi {
            consider::<C, FMA>(c, i, &mut best);
        }
        return best;
    }
    let stride = count.div_ceil(COARSE_POINTS);
    let mut i = lo;
    loop {
        consider::<C, FMA>(c, i, &mut best);
        if i == hi {
            break;
        }
        i = (i + stride).min(hi);
    }
    if best.0 >= lo && best.0 <= hi {
        let centre = best.0;
        for i in centre.saturating_sub(stride - 1).max(lo)..=(centre + stride - 1).min(hi) {
            consider::<C, FMA>(c, i, &mut best);
        }
    }
    best
}

#[inline(always)]
fn consider<C: Candidates, const FMA: bool>(c: &C, i: usize, best: &mut (usize, f32)) {
    let e = c.error::<FMA>(i);
    if e < best.1 || best.0 == usize::MAX {
        *best = (i, e);
    }
}

/// The scale (any float32) minimising the weighted error of block `x`; 0.0 for an all-zero block.
#[inline(always)]
pub fn choose_free<const FMA: bool>(grid: &Grid, x: &[f32], d: &[f32]) -> f32 {
    let amax = abs_max(x);
    if amax == 0.0 {
        return 0.0;
    }
    let mut best = (0f32, f32::INFINITY);
    for sign in [1.0f32, -1.0] {
        if sign < 0.0 && grid.symmetric {
            break;
        }
        let c = FreeCandidates { grid, x, d, signed_amax: sign * amax };
        let (k, e) = search::<_, FMA>(&c, 0, FREE_STEPS, Some(FREE_ONE));
        if e < best.1 {
            best = (c.scale(k), e);
        }
    }
    best.0
}

/// Index of the value of the ascending `table` nearest to `t` (the lower on ties).
#[inline(always)]
fn nearest_in(table: &[f32; 256], t: f32) -> usize {
    let p = table.partition_point(|&v| v < t);
    if p == 0 {
        0
    } else if p == 256 || (t - table[p - 1]) <= (table[p] - t) {
        p - 1
    } else {
        p
    }
}

/// The index into `table` (the 256 scales double quantization decodes for the block's group,
/// ascending) minimising the weighted error of block `x`.
#[inline(always)]
pub fn choose_decodable<const FMA: bool>(grid: &Grid, x: &[f32], d: &[f32], table: &[f32; 256]) -> u8 {
    let amax = abs_max(x);
    if amax == 0.0 {
        // Every code is the zero code; store the scale nearest to zero.
        return nearest_in(table, 0.0) as u8;
    }
    let c = TableCandidates { grid, x, d, table };
    let mut best = (0usize, f32::INFINITY);
    for sign in [1.0f32, -1.0] {
        if sign < 0.0 && grid.symmetric {
            break;
        }
        let (a, b) = if sign > 0.0 { (RATIO_LO * amax, RATIO_HI * amax) } else { (-RATIO_HI * amax, -RATIO_LO * amax) };
        let lo = table.partition_point(|&v| v < a);
        let hi = table.partition_point(|&v| v <= b);
        // `lo..hi` as an inclusive range; empty when nothing lies in the window.
        let (lo, hi) = if hi > lo { (lo, hi - 1) } else { (1, 0) };
        let (q, e) = search::<_, FMA>(&c, lo, hi, Some(nearest_in(table, sign * amax)));
        if e < best.1 {
            best = (q, e);
        }
    }
    best.0 as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::{FP4_CODE, NF4_CODE};

    #[test]
    fn grid_matches_the_encoder() {
        for qt in [QuantType::Nf4, QuantType::Fp4, QuantType::Int4] {
            let g = Grid::new(qt);
            assert!(g.sorted.windows(2).all(|w| w[0] <= w[1]));
            for i in -1100..=1100 {
                let y = i as f32 / 1000.0;
                assert_eq!(g.nibble[g.rank(y)], qt.encoder().encode(y), "{qt:?} {y}");
                assert_eq!(g.nearest(y), g.sorted[g.rank(y)]);
            }
            assert_eq!(qt.code()[g.zero_nibble as usize], 0.0);
        }
        assert!(!Grid::new(QuantType::Nf4).symmetric);
        assert!(Grid::new(QuantType::Fp4).symmetric && Grid::new(QuantType::Int4).symmetric);
        assert_eq!(NF4_CODE[15], 1.0);
        assert_eq!(FP4_CODE[3], 1.0);
    }

    #[test]
    fn free_choice_is_never_worse_than_the_absmax_scale() {
        let g = Grid::new(QuantType::Nf4);
        let mut s = 12345u64;
        for _ in 0..200 {
            let x: Vec<f32> = (0..64)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * if s.is_multiple_of(17) { 4.0 } else { 1.0 }
                })
                .collect();
            let d: Vec<f32> = (0..64).map(|j| 1.0 + (j % 5) as f32).collect();
            let amax = abs_max(&x);
            let chosen = choose_free::<false>(&g, &x, &d);
            assert!(block_error::<false>(&g, &x, &d, chosen) <= block_error::<false>(&g, &x, &d, amax));
        }
        assert_eq!(choose_free::<false>(&g, &[0.0; 32], &[1.0; 32]), 0.0);
    }

    #[test]
    fn negative_scale_wins_for_a_negative_outlier() {
        // One large negative weight and small positive ones: the finer positive half of NF4 is
        // wasted on the positive side with a positive scale.
        let g = Grid::new(QuantType::Nf4);
        let mut x = vec![0.0f32; 64];
        for (j, v) in x.iter_mut().enumerate() {
            *v = -0.9 + 1.8 * ((j * 37 % 64) as f32 / 63.0);
        }
        x[5] = -1.0;
        let d = vec![1.0; 64];
        let pos = block_error::<false>(&g, &x, &d, 1.0);
        let neg = block_error::<false>(&g, &x, &d, -1.0);
        assert_ne!(pos, neg);
        let chosen = choose_free::<false>(&g, &x, &d);
        assert!(block_error::<false>(&g, &x, &d, chosen) <= pos.min(neg));
    }

    struct Bowl(usize);

    impl Candidates for Bowl {
        fn error<const FMA: bool>(&self, i: usize) -> f32 {
            (i as f32 - self.0 as f32).abs()
        }
    }

    #[test]
    fn search_finds_the_minimum_of_a_bowl() {
        for centre in [0usize, 3, 40, 99] {
            assert_eq!(search::<_, false>(&Bowl(centre), 0, 99, None).0, centre);
        }
        assert_eq!(search::<_, false>(&Bowl(2), 5, 4, Some(2)).0, 2);
    }
}
