//! The error-compensating column sweep (GPTQ's, on a 4-bit code table with bitsandbytes' block
//! scales): columns left to right; each weight is rounded to the nearest code at its block's scale,
//! and its rounding error, divided by `U[j, j]`, is spread over the columns after it in proportion
//! to `U[j, j+1..]`, which minimises the layer's output error `tr(ΔW H ΔWᵀ)` given what is already
//! fixed (see `factor`). Errors go to the next 128 columns at once and to the rest of the row in
//! one update per 128 columns (lazy batches); rows are independent and swept in groups of 8 rows
//! in parallel, each with the same operation order, so the result does not depend on the thread
//! count.
//!
//! Scales. When a row holds whole blocks (`cols % blocksize == 0`), a block's scale is chosen when
//! the sweep reaches the block's first column, from the block's weights as the errors of the
//! columns before it have left them, weighting column j by `1 / U[j, j]²` (the cost of its error
//! once the later columns compensate). Its codes then follow column by column. Blocks that run
//! across row ends (other shapes) take their scales beforehand from the original weights, with the
//! same weights and candidates, and the sweep keeps them fixed.
//!
//! Double quantization. bitsandbytes stores each scale as an 8-bit code decoded as
//! `map[q] * nested_absmax[g] + offset` (g = group of 256 blocks; bitsandbytes' offset is the mean
//! of all scales, read back from the stored state), so which values a block can store depends on
//! every other block. The order here: (1) every block's scale is chosen from the original weights
//! (as for fixed scales); (2) these are double-quantized exactly as bitsandbytes does, which fixes
//! the offset and each group's nested absmax; (3) the sweep chooses each block's scale among the
//! 256 values its group decodes to and stores that 8-bit code directly, so every weight is rounded
//! with exactly the scale a reader decodes. (Measured on SmolLM2-135M: deriving the range in (1)
//! from a first full sweep instead gives the same output error, at twice the cost.) Fixed scales
//! are double-quantized first and the sweep uses their decoded values.

use rayon::prelude::*;

use super::factor::HessianFactor;
use super::kernels::{isa_dispatch, madd, Fused};
use super::scale::{choose_decodable, choose_free, Grid};
use crate::blockwise8::{self, NESTED_BLOCKSIZE};
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};

/// Columns swept before their error is pushed to the rest of the row in one update.
const BATCH: usize = 128;
/// Rows one task sweeps together (they share each read of U).
const GROUP_ROWS: usize = 8;
/// Blocks per task when choosing fixed scales.
const SCALE_TASK_BLOCKS: usize = 256;

/// What to calibrate to.
#[derive(Clone, Copy, Debug)]
pub struct CalibrateOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// Choose every scale beforehand from the original weights, even where blocks lie within rows
    /// (for comparison; the default chooses them during the sweep where it can).
    pub fixed_scales: bool,
}

/// Where the block scales go: float32 per block, or double-quantized (8-bit codes per block and
/// float32 per 256 blocks; the offset is returned in the [`Report`]).
pub enum ScalesOut<'a> {
    Float(&'a mut [f32]),
    Double { codes: &'a mut [u8], nested: &'a mut [f32] },
}

/// What a calibration did.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The double-quantization offset (mean of the first pass's scales), with double quant.
    pub offset: Option<f32>,
    /// Scales chosen during the sweep (true) or fixed beforehand (blocks across row ends).
    pub sweep_scales: bool,
    /// `tr(ΔW (H + λI) ΔWᵀ)` of the result, relative to the damped H the factor was built from.
    pub loss: f64,
    /// Blocks stored with a negative scale.
    pub negative_scales: usize,
}

/// Quantizes `w` (row-major `rows x cols`, the layer's `[out, in]` weight) to 4 bits with the
/// column sweep against `factor` (built from the layer input's `XᵀX`, `cols x cols`). Writes the
/// packed codes in bitsandbytes' layout and the scales; see the module docs for how scales are
/// chosen and double-quantized.
pub fn calibrate_4bit(
    w: &[f32],
    rows: usize,
    cols: usize,
    factor: &HessianFactor,
    opts: &CalibrateOptions,
    packed: &mut [u8],
    scales: ScalesOut<'_>,
) -> Result<Report> {
    let bs = opts.blocksize;
    quant4::check_blocksize(bs)?;
    let n = rows * cols;
    if n == 0 || w.len() != n {
        return Err(Error::shape(format!("the weight has {} elements; [{rows}, {cols}] needs {n} (and at least one)", w.len())));
    }
    if factor.n() != cols {
        return Err(Error::shape(format!(
            "the weight has {cols} input features (columns) but the Hessian is {0} x {0}",
            factor.n()
        )));
    }
    if packed.len() != quant4::packed_len(n) {
        return Err(Error::shape(format!("packed buffer has {} bytes; {n} elements need {}", packed.len(), quant4::packed_len(n))));
    }
    let blocks = quant4::num_blocks(n, bs);
    let (scale_len, nested_len) = match &scales {
        ScalesOut::Float(s) => (s.len(), None),
        ScalesOut::Double { codes, nested } => (codes.len(), Some(nested.len())),
    };
    if scale_len != blocks || nested_len.is_some_and(|l| l != blockwise8::nested_blocks(blocks)) {
        return Err(Error::shape(format!(
            "{n} elements in blocks of {bs} need {blocks} scales{}; got {scale_len}{}",
            nested_len.map(|_| format!(" and {} nested scales", blockwise8::nested_blocks(blocks))).unwrap_or_default(),
            nested_len.map(|l| format!(" and {l}")).unwrap_or_default()
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "the weight".into(), index: i, value: w[i] });
    }
    let u = factor.upper();
    let inv_diag: Vec<f32> = (0..cols).map(|i| 1.0 / u[i * cols + i]).collect();
    let weight: Vec<f32> = inv_diag.iter().map(|v| v * v).collect();
    let ctx = Ctx { u, n: cols, inv_diag: &inv_diag, weight: &weight, grid: Grid::new(opts.quant_type), bs };
    let fused = Fused::detect();
    let map = blockwise8::signed_dynamic_map();
    let mut codes = vec![0u8; n];
    let sweep_scales = !opts.fixed_scales && cols.is_multiple_of(bs);
    // Scales chosen from the original weights: the fixed scales of blocks across row ends, and
    // the pilot that sets the double-quantization range for scales chosen in the sweep.
    let original_scales = || {
        let mut s = vec![0f32; blocks];
        s.par_chunks_mut(SCALE_TASK_BLOCKS).enumerate().for_each(|(t, out)| {
            fixed_scales(fused, &ctx.grid, w, cols, &weight, bs, t * SCALE_TASK_BLOCKS, out)
        });
        s
    };
    let (loss, stored, offset) = match (sweep_scales, scales) {
        (true, ScalesOut::Float(out)) => {
            let r = run(fused, &ctx, Choice::Free, w, &mut codes);
            out.copy_from_slice(&r.scales);
            (r.loss, r.scales, None)
        }
        (true, ScalesOut::Double { codes: scale_codes, nested }) => {
            let offset = blockwise8::double_quantize(&original_scales(), scale_codes, nested)?;
            let tables: Vec<[f32; 256]> = nested.iter().map(|&a| std::array::from_fn(|q| map[q] * a + offset)).collect();
            let r = run(fused, &ctx, Choice::Decodable(&tables), w, &mut codes);
            scale_codes.copy_from_slice(&r.scale_codes);
            (r.loss, r.scales, Some(offset))
        }
        (false, ScalesOut::Float(out)) => {
            let fixed = original_scales();
            out.copy_from_slice(&fixed);
            let r = run(fused, &ctx, Choice::Fixed(&fixed), w, &mut codes);
            (r.loss, fixed, None)
        }
        (false, ScalesOut::Double { codes: scale_codes, nested }) => {
            let fixed = original_scales();
            let offset = blockwise8::double_quantize(&fixed, scale_codes, nested)?;
            let mut decoded = vec![0f32; blocks];
            blockwise8::double_dequantize(scale_codes, nested, offset, &map, &mut decoded)?;
            let r = run(fused, &ctx, Choice::Fixed(&decoded), w, &mut codes);
            (r.loss, decoded, Some(offset))
        }
    };
    pack(&codes, packed, ctx.grid.zero_nibble);
    Ok(Report { offset, sweep_scales, loss, negative_scales: stored.iter().filter(|&&s| s < 0.0).count() })
}

/// How the sweep gets a block's scale.
#[derive(Clone, Copy)]
enum Choice<'a> {
    /// Chosen at the block's first column, any float32.
    Free,
    /// Chosen at the block's first column among the values its group of 256 decodes to.
    Decodable(&'a [[f32; 256]]),
    /// Given per block (decoded).
    Fixed(&'a [f32]),
}

struct Ctx<'a> {
    u: &'a [f32],
    n: usize,
    inv_diag: &'a [f32],
    /// 1 / U[j, j]²: what an error in column j costs once the later columns compensate.
    weight: &'a [f32],
    grid: Grid,
    bs: usize,
}

/// One sweep over every row: its loss, and the scales chosen during it (empty for fixed ones).
struct Pass {
    loss: f64,
    scales: Vec<f32>,
    scale_codes: Vec<u8>,
}

fn run(fused: Fused, ctx: &Ctx<'_>, choice: Choice<'_>, w: &[f32], codes: &mut [u8]) -> Pass {
    let n = ctx.n;
    let per_row = if matches!(choice, Choice::Fixed(_)) { 0 } else { n / ctx.bs };
    let groups: Vec<Pass> = w
        .par_chunks(GROUP_ROWS * n)
        .zip(codes.par_chunks_mut(GROUP_ROWS * n))
        .enumerate()
        .map(|(g, (wg, cg))| {
            let rows = wg.len() / n;
            let mut work = wg.to_vec();
            let mut scales = vec![0f32; rows * per_row];
            let mut scale_codes = vec![0u8; rows * per_row];
            let loss = sweep_group(fused, ctx, choice, g * GROUP_ROWS, &mut work, cg, &mut scales, &mut scale_codes);
            Pass { loss, scales, scale_codes }
        })
        .collect();
    // Summed in row order: the same total whatever the thread count.
    let mut all = Pass { loss: 0.0, scales: Vec::new(), scale_codes: Vec::new() };
    for p in groups {
        all.loss += p.loss;
        all.scales.extend(p.scales);
        all.scale_codes.extend(p.scale_codes);
    }
    all
}

isa_dispatch! {
    fn sweep_group(
        ctx: &Ctx<'_>,
        choice: Choice<'_>,
        row0: usize,
        w: &mut [f32],
        codes: &mut [u8],
        scales: &mut [f32],
        scale_codes: &mut [u8],
    ) -> f64 => sweep_group_generic
}

/// Sweeps the rows `row0..` held in `w` (row-major, consumed as the working copy): writes one
/// nibble per weight to `codes` and, for scales chosen here, each block's scale (and its 8-bit
/// code) to `scales` / `scale_codes` (row-major by block). Returns the sum of squared scaled errors.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sweep_group_generic<const FMA: bool>(
    ctx: &Ctx<'_>,
    choice: Choice<'_>,
    row0: usize,
    w: &mut [f32],
    codes: &mut [u8],
    scales: &mut [f32],
    scale_codes: &mut [u8],
) -> f64 {
    let (n, bs, grid) = (ctx.n, ctx.bs, &ctx.grid);
    let rows = w.len() / n;
    let per_row = if matches!(choice, Choice::Fixed(_)) { 0 } else { n / bs };
    let mut errs = vec![0f32; rows * BATCH];
    let mut scale = vec![0f32; rows];
    let mut inv = vec![0f32; rows];
    let mut block_of = vec![usize::MAX; rows];
    let mut loss = 0f64;
    for i1 in (0..n).step_by(BATCH) {
        let i2 = (i1 + BATCH).min(n);
        for r in 0..rows {
            let wr = &mut w[r * n..(r + 1) * n];
            let er = &mut errs[r * BATCH..(r + 1) * BATCH];
            let flat_row = (row0 + r) * n;
            for i in i1..i2 {
                let new_scale = match choice {
                    Choice::Fixed(fixed) if (flat_row + i) / bs != block_of[r] => {
                        block_of[r] = (flat_row + i) / bs;
                        Some(fixed[block_of[r]])
                    }
                    Choice::Free if i % bs == 0 => {
                        let s = choose_free::<FMA>(grid, &wr[i..i + bs], &ctx.weight[i..i + bs]);
                        scales[r * per_row + i / bs] = s;
                        Some(s)
                    }
                    Choice::Decodable(tables) if i % bs == 0 => {
                        let table = &tables[(flat_row + i) / bs / NESTED_BLOCKSIZE];
                        let q = choose_decodable::<FMA>(grid, &wr[i..i + bs], &ctx.weight[i..i + bs], table);
                        scales[r * per_row + i / bs] = table[q as usize];
                        scale_codes[r * per_row + i / bs] = q;
                        Some(table[q as usize])
                    }
                    _ => None,
                };
                if let Some(s) = new_scale {
                    scale[r] = s;
                    inv[r] = if s == 0.0 { 0.0 } else { 1.0 / s };
                }
                let x = wr[i];
                let (nibble, decoded) = if scale[r] == 0.0 {
                    (grid.zero_nibble, 0.0)
                } else {
                    let k = grid.rank(x * inv[r]);
                    (grid.nibble[k], grid.sorted[k] * scale[r])
                };
                codes[r * n + i] = nibble;
                let e = (x - decoded) * ctx.inv_diag[i];
                loss += e as f64 * e as f64;
                er[i - i1] = e;
                let urow = &ctx.u[i * n + i + 1..i * n + i2];
                for (wv, &uv) in wr[i + 1..i2].iter_mut().zip(urow) {
                    *wv = madd::<FMA>(-e, uv, *wv);
                }
            }
        }
        tail_update::<FMA>(ctx.u, n, i1, i2, &errs, w);
    }
    loss
}

/// Rows updated together by [`tail_update`], and the columns they keep in registers.
const TAIL_ROWS: usize = 4;
const TAIL_WIDTH: usize = 16;

/// The batch `i1..i2`'s errors reach the rest of each row: `w[r, j] -= Σ_k err[r, k] U[i1 + k, j]`
/// for j >= i2, summed in k order. Four rows by 16 columns accumulate in registers over the
/// whole batch, so each value of U loaded serves four rows; the edges take a plain loop with the
/// same order of operations.
#[inline(always)]
fn tail_update<const FMA: bool>(u: &[f32], n: usize, i1: usize, i2: usize, errs: &[f32], w: &mut [f32]) {
    let rows = w.len() / n;
    let batch = i2 - i1;
    let full_rows = rows / TAIL_ROWS * TAIL_ROWS;
    let full_end = i2 + (n - i2) / TAIL_WIDTH * TAIL_WIDTH;
    for r0 in (0..full_rows).step_by(TAIL_ROWS) {
        let (e0, e1, e2, e3) = (
            &errs[r0 * BATCH..r0 * BATCH + batch],
            &errs[(r0 + 1) * BATCH..(r0 + 1) * BATCH + batch],
            &errs[(r0 + 2) * BATCH..(r0 + 2) * BATCH + batch],
            &errs[(r0 + 3) * BATCH..(r0 + 3) * BATCH + batch],
        );
        for j0 in (i2..full_end).step_by(TAIL_WIDTH) {
            let load = |w: &[f32], r: usize| -> [f32; TAIL_WIDTH] { w[r * n + j0..r * n + j0 + TAIL_WIDTH].try_into().expect("width") };
            let (mut a0, mut a1, mut a2, mut a3) = (load(w, r0), load(w, r0 + 1), load(w, r0 + 2), load(w, r0 + 3));
            for k in 0..batch {
                let uk: &[f32; TAIL_WIDTH] = u[(i1 + k) * n + j0..(i1 + k) * n + j0 + TAIL_WIDTH].try_into().expect("width");
                let (f0, f1, f2, f3) = (-e0[k], -e1[k], -e2[k], -e3[k]);
                for j in 0..TAIL_WIDTH {
                    a0[j] = madd::<FMA>(f0, uk[j], a0[j]);
                    a1[j] = madd::<FMA>(f1, uk[j], a1[j]);
                    a2[j] = madd::<FMA>(f2, uk[j], a2[j]);
                    a3[j] = madd::<FMA>(f3, uk[j], a3[j]);
                }
            }
            for (rr, a) in [a0, a1, a2, a3].iter().enumerate() {
                w[(r0 + rr) * n + j0..(r0 + rr) * n + j0 + TAIL_WIDTH].copy_from_slice(a);
            }
        }
        for r in r0..r0 + TAIL_ROWS {
            tail_row::<FMA>(u, n, i1, batch, &errs[r * BATCH..], &mut w[r * n..(r + 1) * n], full_end..n);
        }
    }
    for r in full_rows..rows {
        tail_row::<FMA>(u, n, i1, batch, &errs[r * BATCH..], &mut w[r * n..(r + 1) * n], i2..n);
    }
}

/// [`tail_update`] for one row and the columns `cols`.
#[inline(always)]
fn tail_row<const FMA: bool>(u: &[f32], n: usize, i1: usize, batch: usize, errs: &[f32], w: &mut [f32], cols: std::ops::Range<usize>) {
    if cols.is_empty() {
        return;
    }
    for (k, &err) in errs[..batch].iter().enumerate() {
        let urow = &u[(i1 + k) * n + cols.start..(i1 + k) * n + cols.end];
        for (wv, &uv) in w[cols.clone()].iter_mut().zip(urow) {
            *wv = madd::<FMA>(-err, uv, *wv);
        }
    }
}

isa_dispatch! {
    fn fixed_scales(grid: &Grid, w: &[f32], cols: usize, weight: &[f32], bs: usize, first_block: usize, out: &mut [f32])
        => fixed_scales_generic
}

/// Scales of blocks `first_block..` chosen from the original weights (blocks may span rows).
#[inline(always)]
fn fixed_scales_generic<const FMA: bool>(
    grid: &Grid,
    w: &[f32],
    cols: usize,
    weight: &[f32],
    bs: usize,
    first_block: usize,
    out: &mut [f32],
) {
    let mut d = vec![0f32; bs];
    for (b, o) in out.iter_mut().enumerate() {
        let f0 = (first_block + b) * bs;
        let f1 = (f0 + bs).min(w.len());
        for (dv, f) in d.iter_mut().zip(f0..f1) {
            *dv = weight[f % cols];
        }
        *o = choose_free::<FMA>(grid, &w[f0..f1], &d[..f1 - f0]);
    }
}

/// bitsandbytes' packing: element 2j in the high nibble of byte j, 2j+1 in the low one; an odd
/// tail pads with the code of 0.0.
fn pack(codes: &[u8], packed: &mut [u8], zero: u8) {
    packed.par_iter_mut().enumerate().for_each(|(j, p)| {
        let low = codes.get(2 * j + 1).copied().unwrap_or(zero);
        *p = (codes[2 * j] << 4) | low;
    });
}
