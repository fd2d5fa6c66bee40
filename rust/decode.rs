//! The small steps of a decoder layer's forward that sit between its 4-bit products, for
//! generating on the CPU: RMS normalization, rotary position embeddings and one query token's
//! attention over the key/value cache. In a 135M-parameter model each of them does a few
//! microseconds of work, while PyTorch runs it as 5-10 ops of 2-5 us each (or, for attention, a
//! kernel built for long sequences): per generated token they cost as much as all the layer's
//! weights take to read.
//!
//! They compute in float32 and round to the tensors' dtype where the PyTorch code they stand in
//! for does (`qlora_rs.nn.cpu_decode` checks each module against its own forward before using it).

use crate::cpu_isa::{Host, Isa};
use crate::dtype::{Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::reduce::{torch_mean_f32, SumOrder};

/// Multiply-adds below which attention runs on the calling thread alone (as in `matmul4`).
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 17;

/// Where an RMS norm applies its weight (both normalize in float32 first: `h = x * (1 / sqrt(mean(x^2) + eps))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormStyle {
    /// `weight * h` with `h` rounded to the dtype first, the product rounded again (transformers'
    /// `LlamaRMSNorm` and the many that copy it).
    Llama,
    /// `h * (1 + weight)` in float32, rounded once (`GemmaRMSNorm`, `Gemma3RMSNorm`: the weight is
    /// an offset from 1).
    Gemma,
}

/// RMS normalization of rows of `weight.len()` values in the given [`NormStyle`]. The mean sums
/// in PyTorch's order (`crate::reduce`, one thread a row, as torch reduces the last dimension of a
/// small tensor), so the result is torch's bit for bit. `x`, `weight` and `out` share one dtype.
pub fn rms_norm(x: FloatSlice<'_>, weight: FloatSlice<'_>, eps: f32, style: NormStyle, out: FloatSliceMut<'_>) -> Result<()> {
    let cols = weight.len();
    if x.dtype() != weight.dtype() || x.dtype() != out.dtype() {
        return Err(Error::shape(format!(
            "rms_norm: x is {}, weight {}, out {}; expected one dtype",
            x.dtype().name(),
            weight.dtype().name(),
            out.dtype().name()
        )));
    }
    if cols == 0 || !x.len().is_multiple_of(cols) || out.len() != x.len() {
        return Err(Error::shape(format!(
            "rms_norm: x has {} elements, out {}, weight {cols}: expected rows of the weight's length",
            x.len(),
            out.len()
        )));
    }
    match (x, weight, out) {
        (FloatSlice::F32(x), FloatSlice::F32(w), FloatSliceMut::F32(o)) => rms_rows(x, w, eps, style, o),
        (FloatSlice::F16(x), FloatSlice::F16(w), FloatSliceMut::F16(o)) => rms_rows(x, w, eps, style, o),
        (FloatSlice::BF16(x), FloatSlice::BF16(w), FloatSliceMut::BF16(o)) => rms_rows(x, w, eps, style, o),
        _ => unreachable!("dtypes checked above"),
    }
    Ok(())
}

fn rms_rows<T: Element>(x: &[T], weight: &[T], eps: f32, style: NormStyle, out: &mut [T]) {
    let cols = weight.len();
    let order = SumOrder::new(crate::reduce::TORCH_SUM_WIDTH, 1);
    let mut h = vec![0f32; cols];
    let mut sq = vec![0f32; cols];
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for ((h, s), v) in h.iter_mut().zip(&mut sq).zip(xr) {
            *h = v.to_f32();
            *s = *h * *h;
        }
        // torch.rsqrt(v) on the CPU: 1 / sqrt(v), each rounded.
        let inv = 1.0 / (torch_mean_f32(&sq, order) + eps).sqrt();
        match style {
            // The two roundings of `LlamaRMSNorm`: `weight * T(h * inv)`.
            NormStyle::Llama => {
                for ((o, &h), w) in or.iter_mut().zip(&h).zip(weight) {
                    *o = T::from_f32(w.to_f32() * T::from_f32(h * inv).to_f32());
                }
            }
            // Gemma's one: `T((h * inv) * (1 + weight))`, each step a float32 rounding.
            NormStyle::Gemma => {
                for ((o, &h), w) in or.iter_mut().zip(&h).zip(weight) {
                    *o = T::from_f32((h * inv) * (1.0 + w.to_f32()));
                }
            }
        }
    }
}

/// The shapes of one decoding step's attention: `batch` sequences of one query token each,
/// `heads` query heads sharing `kv_heads` key/value heads (grouped-query attention: query head
/// `h` reads key/value head `h / (heads / kv_heads)`), `len` cached positions, `dim` per head.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub dim: usize,
}

/// Softmax attention of one query token per sequence over its cached keys and values:
/// `out[b, h] = softmax(scale * q[b, h] . k[b, g, j] + mask[b, j] over j) @ v[b, g]` with
/// `g = h / (heads / kv_heads)`, in float32, rounded once to the output dtype.
///
/// `q` and `out`: `[batch, heads, dim]`; `k` and `v`: `[batch, kv_heads, len, dim]`, contiguous;
/// `mask`: None, or `[batch, len]` float32 added to the scores (`-inf` leaves a position out).
/// A row whose positions are all left out gives zeros. All tensors but the mask share one dtype.
#[allow(clippy::too_many_arguments)]
pub fn attend_one_token(
    q: FloatSlice<'_>,
    k: FloatSlice<'_>,
    v: FloatSlice<'_>,
    mask: Option<&[f32]>,
    scale: f32,
    shape: AttentionShape,
    out: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
) -> Result<()> {
    let AttentionShape { batch, heads, kv_heads, len, dim } = shape;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::shape(format!("attention: {heads} query heads do not share {kv_heads} key/value heads evenly")));
    }
    let want = [
        ("q", q.len(), batch * heads * dim),
        ("k", k.len(), batch * kv_heads * len * dim),
        ("v", v.len(), batch * kv_heads * len * dim),
        ("out", out.len(), batch * heads * dim),
        ("mask", mask.map_or(batch * len, <[f32]>::len), batch * len),
    ];
    check_lengths("attention", &shape, &want)?;
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() || q.dtype() != out.dtype() {
        return Err(Error::shape(format!(
            "attention: q is {}, k {}, v {}, out {}; expected one dtype",
            q.dtype().name(),
            k.dtype().name(),
            v.dtype().name(),
            out.dtype().name()
        )));
    }
    host.check(isa)?;
    match (q, k, v, out) {
        (FloatSlice::F32(q), FloatSlice::F32(k), FloatSlice::F32(v), FloatSliceMut::F32(o)) => {
            attend(q, k, v, mask, scale, shape, o, isa, host)
        }
        (FloatSlice::F16(q), FloatSlice::F16(k), FloatSlice::F16(v), FloatSliceMut::F16(o)) => {
            attend(q, k, v, mask, scale, shape, o, isa, host)
        }
        (FloatSlice::BF16(q), FloatSlice::BF16(k), FloatSlice::BF16(v), FloatSliceMut::BF16(o)) => {
            attend(q, k, v, mask, scale, shape, o, isa, host)
        }
        _ => unreachable!("dtypes checked above"),
    }
    Ok(())
}

/// Each `(name, elements, needed)` of `want` has the elements `shape` needs, else an error that
/// names the first that has not: `"{what}: {name} has {elements} elements; {shape:?} needs {needed}"`.
pub(crate) fn check_lengths(what: &str, shape: &impl std::fmt::Debug, want: &[(&str, usize, usize)]) -> Result<()> {
    match want.iter().find(|(_, have, need)| have != need) {
        Some((name, have, need)) => Err(Error::shape(format!("{what}: {name} has {have} elements; {shape:?} needs {need}"))),
        None => Ok(()),
    }
}

/// The output rows shared by the threads (each task writes its own heads).
struct OutRows<T>(*mut T);
// SAFETY: tasks write disjoint rows of a buffer that outlives them.
unsafe impl<T> Send for OutRows<T> {}
unsafe impl<T> Sync for OutRows<T> {}

impl<T> OutRows<T> {
    /// Row `row` of `dim` elements.
    ///
    /// SAFETY: the row is in bounds and no one else uses it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, row: usize, dim: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(row * dim), dim) }
    }
}

#[allow(clippy::too_many_arguments)]
fn attend<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    scale: f32,
    shape: AttentionShape,
    out: &mut [T],
    isa: Isa,
    host: Host,
) {
    let AttentionShape { batch, heads, kv_heads, len, dim } = shape;
    let group = heads / kv_heads;
    let rows = batch * heads;
    let out_rows = OutRows(out.as_mut_ptr());
    // One task per key/value head of a sequence: its `group` query heads read the same keys.
    let task = |t: usize| {
        let (b, g) = (t / kv_heads, t % kv_heads);
        let at = (b * kv_heads + g) * len * dim;
        let (ks, vs) = (&k[at..at + len * dim], &v[at..at + len * dim]);
        let mask = mask.map(|m| &m[b * len..(b + 1) * len]);
        let mut scores = vec![0f32; len];
        let mut qf = vec![0f32; dim];
        let mut acc = vec![0f32; dim];
        for h in g * group..(g + 1) * group {
            let row = b * heads + h;
            for (f, x) in qf.iter_mut().zip(&q[row * dim..(row + 1) * dim]) {
                *f = x.to_f32();
            }
            head(isa, &qf, ks, vs, mask, scale, &mut scores, &mut acc);
            // SAFETY: row `row` of out (dim elements, in bounds: checked by the caller) belongs to this task.
            let o = unsafe { out_rows.row(row, dim) };
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = T::from_f32(*a);
            }
        }
    };
    let work = rows.saturating_mul(len).saturating_mul(dim);
    let threads = if work < PARALLEL_MIN_WORK { 1 } else { host.team_size() };
    crate::threads::run_tasks(threads, batch * kv_heads, &task);
}

/// One query head: scores, softmax, weighted sum of the values into `acc`.
#[allow(clippy::too_many_arguments)]
fn head<T: Element>(
    isa: Isa,
    q: &[f32],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: every level above portable has AVX2 and FMA (the caller checked `isa`).
        unsafe { head_avx2(q, k, v, mask, scale, scores, acc) };
        return;
    }
    let _ = isa;
    head_generic(q, k, v, mask, scale, scores, acc)
}

/// [`head_generic`] compiled for AVX2 + FMA, so that its loops use 8-wide vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx2<T: Element>(
    q: &[f32],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
) {
    head_generic(q, k, v, mask, scale, scores, acc)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head_generic<T: Element>(
    q: &[f32],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
) {
    let dim = q.len();
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let mut lanes = [0f32; 8];
        let key = &k[j * dim..(j + 1) * dim];
        let mut chunks = key.chunks_exact(8);
        let mut qc = q.chunks_exact(8);
        for (kc, qv) in (&mut chunks).zip(&mut qc) {
            for l in 0..8 {
                lanes[l] = qv[l].mul_add(kc[l].to_f32(), lanes[l]);
            }
        }
        let mut dot = lanes.iter().sum::<f32>();
        for (kv, qv) in chunks.remainder().iter().zip(qc.remainder()) {
            dot = qv.mul_add(kv.to_f32(), dot);
        }
        *s = dot * scale + mask.map_or(0.0, |m| m[j]);
        max = max.max(*s);
    }
    acc.fill(0.0);
    if max == f32::NEG_INFINITY {
        return; // every position masked out
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    for (j, &p) in scores.iter().enumerate() {
        for (a, x) in acc.iter_mut().zip(&v[j * dim..(j + 1) * dim]) {
            *a = p.mul_add(x.to_f32(), *a);
        }
    }
    let inv = 1.0 / total;
    for a in acc.iter_mut() {
        *a *= inv;
    }
}

/// Rotary position embeddings of one token a sequence, as transformers' `apply_rotary_pos_emb`
/// computes them: `x * cos + rotate_half(x) * sin`, where `rotate_half(x)` is `(-x[dim/2..],
/// x[..dim/2])`, each of the two products and their sum rounded to the dtype (three PyTorch ops).
/// `q` and `k`: `batch` rows of heads of `dim` values each (`[batch, heads, dim]`, any number of
/// heads); `cos` and `sin`: `[batch, dim]`; the results go to `q_out` and `k_out`. One dtype.
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    q: FloatSlice<'_>,
    k: FloatSlice<'_>,
    cos: FloatSlice<'_>,
    sin: FloatSlice<'_>,
    batch: usize,
    dim: usize,
    q_out: FloatSliceMut<'_>,
    k_out: FloatSliceMut<'_>,
) -> Result<()> {
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::shape(format!("rotary: a head of {dim} values; expected an even number")));
    }
    let row = batch * dim;
    for (name, have) in [("cos", cos.len()), ("sin", sin.len())] {
        if have != row {
            return Err(Error::shape(format!("rotary: {name} has {have} elements; {batch} rows of {dim} need {row}")));
        }
    }
    for (name, have, out) in [("q", q.len(), q_out.len()), ("k", k.len(), k_out.len())] {
        if (row == 0 && have != 0) || (row != 0 && !have.is_multiple_of(row)) || out != have {
            return Err(Error::shape(format!(
                "rotary: {name} has {have} elements and its output {out}; expected heads of {dim} for each of {batch} rows, \
                 and an output of the same size"
            )));
        }
    }
    let dtypes = [q.dtype(), k.dtype(), cos.dtype(), sin.dtype(), q_out.dtype(), k_out.dtype()];
    if dtypes.iter().any(|&d| d != q.dtype()) {
        return Err(Error::shape(format!(
            "rotary: q, k, cos, sin, q_out, k_out are {}; expected one dtype",
            dtypes.map(|d| d.name()).join(", ")
        )));
    }
    if row == 0 {
        return Ok(());
    }
    match (q, k, cos, sin, q_out, k_out) {
        (FloatSlice::F32(q), FloatSlice::F32(k), FloatSlice::F32(c), FloatSlice::F32(s), FloatSliceMut::F32(qo), FloatSliceMut::F32(ko)) => {
            rotate_rows(q, c, s, batch, dim, qo);
            rotate_rows(k, c, s, batch, dim, ko);
        }
        (FloatSlice::F16(q), FloatSlice::F16(k), FloatSlice::F16(c), FloatSlice::F16(s), FloatSliceMut::F16(qo), FloatSliceMut::F16(ko)) => {
            rotate_rows(q, c, s, batch, dim, qo);
            rotate_rows(k, c, s, batch, dim, ko);
        }
        (
            FloatSlice::BF16(q),
            FloatSlice::BF16(k),
            FloatSlice::BF16(c),
            FloatSlice::BF16(s),
            FloatSliceMut::BF16(qo),
            FloatSliceMut::BF16(ko),
        ) => {
            rotate_rows(q, c, s, batch, dim, qo);
            rotate_rows(k, c, s, batch, dim, ko);
        }
        _ => unreachable!("dtypes checked above"),
    }
    Ok(())
}

fn rotate_rows<T: Element>(x: &[T], cos: &[T], sin: &[T], batch: usize, dim: usize, out: &mut [T]) {
    let half = dim / 2;
    let per_row = x.len() / batch;
    if per_row == 0 {
        return; // no heads
    }
    for ((xb, ob), (c, s)) in x.chunks_exact(per_row).zip(out.chunks_exact_mut(per_row)).zip(cos.chunks_exact(dim).zip(sin.chunks_exact(dim))) {
        for (xh, oh) in xb.chunks_exact(dim).zip(ob.chunks_exact_mut(dim)) {
            for j in 0..dim {
                let turned = if j < half { -xh[j + half].to_f32() } else { xh[j - half].to_f32() };
                let a = T::from_f32(xh[j].to_f32() * c[j].to_f32()).to_f32();
                let b = T::from_f32(turned * s[j].to_f32()).to_f32();
                oh[j] = T::from_f32(a + b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// float64 attention of one head.
    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, scale: f32) -> Vec<f64> {
        let dim = q.len();
        let len = k.len() / dim;
        let s: Vec<f64> = (0..len)
            .map(|j| {
                let dot: f64 = (0..dim).map(|d| q[d] as f64 * k[j * dim + d] as f64).sum();
                dot * scale as f64 + mask.map_or(0.0, |m| m[j] as f64)
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return vec![0.0; dim];
        }
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = e.iter().sum();
        (0..dim).map(|d| (0..len).map(|j| e[j] * v[j * dim + d] as f64).sum::<f64>() / total).collect()
    }

    #[test]
    fn attention_matches_float64_for_every_level_and_grouping() {
        let mut seed = 7u64;
        for &(batch, heads, kv_heads, len, dim) in &[(1, 9, 3, 41, 64), (2, 4, 4, 5, 8), (1, 8, 1, 300, 128), (3, 6, 2, 1, 13)] {
            let shape = AttentionShape { batch, heads, kv_heads, len, dim };
            let q: Vec<f32> = (0..batch * heads * dim).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..batch * kv_heads * len * dim).map(|_| lcg(&mut seed) * 2.0).collect();
            let v: Vec<f32> = (0..batch * kv_heads * len * dim).map(|_| lcg(&mut seed)).collect();
            // Leave out every third position of the last sequence, and all of the first one's when
            // there are more (its output is then zeros).
            let mut mask = vec![0f32; batch * len];
            for j in (0..len).step_by(3) {
                mask[(batch - 1) * len + j] = f32::NEG_INFINITY;
            }
            if batch > 1 {
                mask[..len].fill(f32::NEG_INFINITY);
            }
            for isa in Isa::available() {
                for masked in [false, true] {
                    let m = masked.then_some(&mask[..]);
                    let mut out = vec![0f32; q.len()];
                    attend_one_token(
                        FloatSlice::F32(&q),
                        FloatSlice::F32(&k),
                        FloatSlice::F32(&v),
                        m,
                        0.125,
                        shape,
                        FloatSliceMut::F32(&mut out),
                        isa,
                        Host::Native,
                    )
                    .unwrap();
                    for b in 0..batch {
                        for h in 0..heads {
                            let g = h / (heads / kv_heads);
                            let at = (b * kv_heads + g) * len * dim;
                            let want = reference(
                                &q[(b * heads + h) * dim..][..dim],
                                &k[at..at + len * dim],
                                &v[at..at + len * dim],
                                m.map(|m| &m[b * len..(b + 1) * len]),
                                0.125,
                            );
                            for (d, w) in want.iter().enumerate() {
                                let got = out[(b * heads + h) * dim + d] as f64;
                                assert!((got - w).abs() < 1e-5, "{shape:?} {isa:?} masked={masked} b{b} h{h} d{d}: {got} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_rounds_once_to_bf16_and_names_bad_shapes() {
        let mut seed = 3u64;
        let shape = AttentionShape { batch: 1, heads: 2, kv_heads: 1, len: 7, dim: 16 };
        let q: Vec<bf16> = (0..32).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let k: Vec<bf16> = (0..112).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let v: Vec<bf16> = (0..112).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let mut want = vec![0f32; 32];
        attend_one_token(
            FloatSlice::F32(&f(&q)),
            FloatSlice::F32(&f(&k)),
            FloatSlice::F32(&f(&v)),
            None,
            0.25,
            shape,
            FloatSliceMut::F32(&mut want),
            Isa::Portable,
            Host::Native,
        )
        .unwrap();
        let mut out = vec![bf16::ZERO; 32];
        let (qs, ks, vs) = (FloatSlice::BF16(&q), FloatSlice::BF16(&k), FloatSlice::BF16(&v));
        attend_one_token(qs, ks, vs, None, 0.25, shape, FloatSliceMut::BF16(&mut out), Isa::Portable, Host::Native).unwrap();
        for (o, w) in out.iter().zip(&want) {
            assert_eq!(*o, bf16::from_f32(*w));
        }
        let bad = AttentionShape { len: 8, ..shape };
        let err = attend_one_token(qs, ks, vs, None, 0.25, bad, FloatSliceMut::BF16(&mut out), Isa::Portable, Host::Native)
            .unwrap_err()
            .to_string();
        assert!(err.contains("k has 112 elements") && err.contains("needs 128"), "{err}");
        let uneven = AttentionShape { heads: 3, kv_heads: 2, ..shape };
        let err = attend_one_token(qs, ks, vs, None, 0.25, uneven, FloatSliceMut::BF16(&mut out), Isa::Portable, Host::Native)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 query heads do not share 2"), "{err}");
    }

    #[test]
    fn rms_norm_rounds_twice_as_llama_does() {
        let mut seed = 11u64;
        let cols = 576;
        let x: Vec<bf16> = (0..3 * cols).map(|_| bf16::from_f32(lcg(&mut seed) * 4.0)).collect();
        let w: Vec<bf16> = (0..cols).map(|_| bf16::from_f32(1.0 + lcg(&mut seed) * 0.5)).collect();
        let mut out = vec![bf16::ZERO; x.len()];
        rms_norm(FloatSlice::BF16(&x), FloatSlice::BF16(&w), 1e-5, NormStyle::Llama, FloatSliceMut::BF16(&mut out)).unwrap();
        {
            for r in 0..3 {
                let row: Vec<f64> = x[r * cols..(r + 1) * cols].iter().map(|v| v.to_f32() as f64).collect();
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + 1e-5).sqrt();
                for c in 0..cols {
                    let h = bf16::from_f64(row[c] * inv).to_f32();
                    let want = bf16::from_f32(w[c].to_f32() * h);
                    let got = out[r * cols + c];
                    // The float32 mean may differ from the exact one in its last bit.
                    assert!((got.to_f32() - want.to_f32()).abs() <= 2.0 * want.to_f32().abs() / 256.0, "r{r} c{c}");
                }
            }
        }
        let err = rms_norm(FloatSlice::BF16(&x[..100]), FloatSlice::BF16(&w), 1e-5, NormStyle::Llama, FloatSliceMut::BF16(&mut out[..100]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x has 100 elements"), "{err}");
    }

    /// Gemma's style: `(h * inv) * (1 + w)` in float32 (each step rounded to float32, as torch's
    /// ops round), rounded once to the dtype; for float32 and bf16 tensors.
    #[test]
    fn rms_norm_gemma_style_rounds_once_with_the_weight_plus_one() {
        let mut seed = 5u64;
        let cols = 64;
        let x: Vec<f32> = (0..2 * cols).map(|_| lcg(&mut seed) * 4.0).collect();
        let w: Vec<f32> = (0..cols).map(|_| (lcg(&mut seed) * 64.0).round() / 128.0).collect(); // 1 + w exact
        let mut out = vec![0f32; x.len()];
        rms_norm(FloatSlice::F32(&x), FloatSlice::F32(&w), 1e-6, NormStyle::Gemma, FloatSliceMut::F32(&mut out)).unwrap();
        let order = SumOrder::new(crate::reduce::TORCH_SUM_WIDTH, 1);
        for r in 0..2 {
            let row = &x[r * cols..(r + 1) * cols];
            let sq: Vec<f32> = row.iter().map(|v| v * v).collect();
            let inv = 1.0 / (torch_mean_f32(&sq, order) + 1e-6).sqrt();
            for c in 0..cols {
                assert_eq!(out[r * cols + c].to_bits(), ((row[c] * inv) * (1.0 + w[c])).to_bits(), "r{r} c{c}");
            }
        }
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut gemma = vec![bf16::ZERO; x.len()];
        rms_norm(FloatSlice::BF16(&xb), FloatSlice::BF16(&wb), 1e-6, NormStyle::Gemma, FloatSliceMut::BF16(&mut gemma)).unwrap();
        for r in 0..2 {
            let row: Vec<f32> = xb[r * cols..(r + 1) * cols].iter().map(|v| v.to_f32()).collect();
            let sq: Vec<f32> = row.iter().map(|v| v * v).collect();
            let inv = 1.0 / (torch_mean_f32(&sq, order) + 1e-6).sqrt();
            for c in 0..cols {
                let want = bf16::from_f32((row[c] * inv) * (1.0 + wb[c].to_f32()));
                assert_eq!(gemma[r * cols + c], want, "r{r} c{c}");
            }
        }
    }

    /// cos = 1, sin = 0 keeps a head; cos = 0, sin = 1 turns it half over (`rotate_half`); each
    /// row of a batch takes its own cos and sin; and the products round before the sum (bf16).
    #[test]
    fn rotary_turns_halves_and_rounds_each_step() {
        let dim = 4;
        let q: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]; // batch 2, one head
        let k: Vec<f32> = [[-1.0, 0.5, 2.0, -3.0]; 2].concat(); // one head, the same in both rows
        let cos = vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let sin = vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let (mut qo, mut ko) = (vec![0f32; 8], vec![0f32; 8]);
        rotary(
            FloatSlice::F32(&q),
            FloatSlice::F32(&k),
            FloatSlice::F32(&cos),
            FloatSlice::F32(&sin),
            2,
            dim,
            FloatSliceMut::F32(&mut qo),
            FloatSliceMut::F32(&mut ko),
        )
        .unwrap();
        assert_eq!(qo, vec![1.0, 2.0, 3.0, 4.0, -7.0, -8.0, 5.0, 6.0]);
        assert_eq!(ko, vec![-1.0, 0.5, 2.0, -3.0, -2.0, 3.0, -1.0, 0.5]);

        // bf16, where rounding the product first matters: x0 * c0 = (1 + 2^-7)^2 rounds to 1 + 2^-6,
        // and 1 + 2^-6 - (2^-8 + 2^-14) to 1 + 2^-7; the unrounded sum 1 + 3 * 2^-8 would give 1 + 2^-6.
        let b = |v: f32| bf16::from_f32(v);
        let x = vec![b(1.0 + 1.0 / 128.0), b(1.0)];
        let (c, s) = (vec![b(1.0 + 1.0 / 128.0), b(1.0)], vec![b(1.0 / 256.0 + 1.0 / 16384.0), b(0.0)]);
        let (mut xo, mut none) = (vec![b(0.0); 2], Vec::<bf16>::new());
        rotary(
            FloatSlice::BF16(&x),
            FloatSlice::BF16(&[]),
            FloatSlice::BF16(&c),
            FloatSlice::BF16(&s),
            1,
            2,
            FloatSliceMut::BF16(&mut xo),
            FloatSliceMut::BF16(&mut none),
        )
        .unwrap();
        assert_eq!(xo[0].to_f32(), 1.0 + 1.0 / 128.0);
        assert_eq!(xo[1].to_f32(), 1.0);

        let err = rotary(
            FloatSlice::F32(&q[..6]),
            FloatSlice::F32(&k),
            FloatSlice::F32(&cos),
            FloatSlice::F32(&sin),
            2,
            dim,
            FloatSliceMut::F32(&mut qo[..6]),
            FloatSliceMut::F32(&mut ko),
        )
        .unwrap_err();
        assert!(err.to_string().contains("q has 6 elements"), "{err}");
    }
}
