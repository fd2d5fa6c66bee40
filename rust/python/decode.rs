//! Bindings of `crate::decode`: RMS normalization, rotary embeddings and one token's attention, for the CPU decoding
//! path of `qlora_rs.nn.cpu_decode`; and of `crate::lora`, a LoRA adapter's share of a layer's output. Tensors (or DLPack capsules) are contiguous CPU tensors.

use pyo3::prelude::*;

use super::tensor_arg::{no_overlap, Elem, HeldTensor, TensorArg};
use super::to_pyerr;
use crate::cpu_isa::{Host, Isa};
use crate::decode::{self, AttentionShape};
use crate::dtype::FloatSlice;
use crate::lora::{self, LoraShape};

/// `out = weight * (x / sqrt(mean(x^2, -1) + eps))` as transformers' `LlamaRMSNorm` computes it
/// (float32, rounded to the dtype before the weight and after), bit for bit; with `unit_offset`,
/// `(x / sqrt(...)) * (1 + weight)` as `GemmaRMSNorm` computes it (float32, rounded once). `x` and
/// `out`: rows of `weight`'s length; all three of one float dtype.
#[pyfunction]
#[pyo3(signature = (x, weight, eps, out, unit_offset=false))]
fn cpu_rms_norm(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    eps: f32,
    out: &Bound<'_, PyAny>,
    unit_offset: bool,
) -> PyResult<()> {
    let x = TensorArg::new(x, "cpu_rms_norm: x")?;
    let weight = TensorArg::new(weight, "cpu_rms_norm: weight")?;
    let out = TensorArg::new(out, "cpu_rms_norm: out")?;
    no_overlap(&[&out], &[&x, &weight])?;
    let (xs, ws) = (x.float_slice()?, weight.float_slice()?);
    // SAFETY: out overlaps neither input (checked above).
    let os = unsafe { out.float_slice_mut()? };
    let style = if unit_offset { decode::NormStyle::Gemma } else { decode::NormStyle::Llama };
    py.detach(|| decode::rms_norm(xs, ws, eps, style, os)).map_err(to_pyerr)
}

/// Rotary position embeddings of one token a sequence, as transformers' `apply_rotary_pos_emb`
/// (bit for bit): `q` and `k` `[batch, heads, dim]` (each its own number of heads), `cos` and
/// `sin` `[batch, dim]`, the results into `q_out` and `k_out`; all of one float dtype.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cpu_rotary(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    cos: &Bound<'_, PyAny>,
    sin: &Bound<'_, PyAny>,
    batch: usize,
    dim: usize,
    q_out: &Bound<'_, PyAny>,
    k_out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let q = TensorArg::new(q, "cpu_rotary: q")?;
    let k = TensorArg::new(k, "cpu_rotary: k")?;
    let cos = TensorArg::new(cos, "cpu_rotary: cos")?;
    let sin = TensorArg::new(sin, "cpu_rotary: sin")?;
    let q_out = TensorArg::new(q_out, "cpu_rotary: q_out")?;
    let k_out = TensorArg::new(k_out, "cpu_rotary: k_out")?;
    no_overlap(&[&q_out, &k_out], &[&q, &k, &cos, &sin])?;
    let (qs, ks, cs, ss) = (q.float_slice()?, k.float_slice()?, cos.float_slice()?, sin.float_slice()?);
    // SAFETY: the outputs overlap no input and each other (checked above).
    let (qo, ko) = unsafe { (q_out.float_slice_mut()?, k_out.float_slice_mut()?) };
    py.detach(|| decode::rotary(qs, ks, cs, ss, batch, dim, qo, ko)).map_err(to_pyerr)
}

/// Attention of one query token per sequence: `q` and `out` `[batch, heads, dim]`, `k` and `v`
/// `[batch, kv_heads, length, dim]` (one float dtype), `mask` None or float32 `[batch, length]`
/// added to the scores. Computed in float32 on the widest level this CPU runs (`cpu_isa()`).
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, scale, batch, heads, kv_heads, length, dim, out))]
#[allow(clippy::too_many_arguments)]
fn cpu_attend_one_token(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    scale: f32,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    length: usize,
    dim: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let isa = Isa::current().map_err(to_pyerr)?;
    let q = TensorArg::new(q, "cpu_attend_one_token: q")?;
    let k = TensorArg::new(k, "cpu_attend_one_token: k")?;
    let v = TensorArg::new(v, "cpu_attend_one_token: v")?;
    let mask = match mask {
        Some(m) => Some(TensorArg::new(m, "cpu_attend_one_token: mask")?.expect(Elem::F32)?),
        None => None,
    };
    let out = TensorArg::new(out, "cpu_attend_one_token: out")?;
    let mut inputs = vec![&q, &k, &v];
    inputs.extend(mask.as_ref());
    no_overlap(&[&out], &inputs)?;
    let (qs, ks, vs) = (q.float_slice()?, k.float_slice()?, v.float_slice()?);
    let ms = match &mask {
        Some(m) => Some(m.slice::<f32>()?),
        None => None,
    };
    // SAFETY: out overlaps no input (checked above).
    let os = unsafe { out.float_slice_mut()? };
    let shape = AttentionShape { batch, heads, kv_heads, len: length, dim };
    py.detach(|| decode::attend_one_token(qs, ks, vs, ms, scale, shape, os, isa, Host::Native)).map_err(to_pyerr)
}

/// A LoRA adapter for the CPU kernels, checked once and held: `lora_A` `[rank, in_features]` and
/// `lora_B` `[out_features, rank]`, of one float dtype (tensors or DLPack capsules), and its scaling.
#[pyclass(name = "LoraAdapter", module = "qlora_rs._lib", frozen)]
pub(super) struct LoraAdapter {
    a: HeldTensor,
    b: HeldTensor,
    shape: LoraShape,
    scaling: f32,
}

#[pymethods]
impl LoraAdapter {
    #[new]
    #[pyo3(signature = (lora_a, lora_b, in_features, scaling))]
    fn new(lora_a: &Bound<'_, PyAny>, lora_b: &Bound<'_, PyAny>, in_features: usize, scaling: f32) -> PyResult<Self> {
        let a = TensorArg::new(lora_a, "LoraAdapter: lora_A")?;
        let b = TensorArg::new(lora_b, "LoraAdapter: lora_B")?;
        if a.float_dtype()? != b.float_dtype()? {
            return Err(to_pyerr(crate::Error::shape(format!(
                "LoraAdapter: lora_A is {}, lora_B {}; expected one float dtype",
                a.elem.name(),
                b.elem.name()
            ))));
        }
        if in_features == 0 || a.len % in_features != 0 || a.len == 0 || b.len % (a.len / in_features) != 0 {
            return Err(to_pyerr(crate::Error::shape(format!(
                "LoraAdapter: lora_A has {} elements and lora_B {}; expected [rank, {in_features}] and [out_features, rank]",
                a.len, b.len
            ))));
        }
        let rank = a.len / in_features;
        let shape = LoraShape { rows: 0, in_features, rank, out_features: b.len / rank };
        Ok(LoraAdapter { a: HeldTensor(a), b: HeldTensor(b), shape, scaling })
    }

    #[getter]
    fn rank(&self) -> usize {
        self.shape.rank
    }
}

impl LoraAdapter {
    /// The adapter for `rows` rows, as `crate::matmul4` and `crate::lora` take it.
    pub(super) fn parts(&self) -> PyResult<(FloatSlice<'_>, FloatSlice<'_>, LoraShape, f32)> {
        Ok((self.a.0.float_slice()?, self.b.0.float_slice()?, self.shape, self.scaling))
    }

    pub(super) fn tensors(&self) -> [&TensorArg; 2] {
        [&self.a.0, &self.b.0]
    }
}

/// `y += round((lora_B @ (lora_A @ x)) * scaling)` in place (rounded to y's dtype, then the sum
/// rounded): `x` `[rows, in_features]` and `y` `[rows, out_features]` of any float dtype; summed
/// in float32.
#[pyfunction]
fn cpu_lora_add(py: Python<'_>, adapter: &Bound<'_, LoraAdapter>, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<()> {
    let isa = Isa::current().map_err(to_pyerr)?;
    let adapter = adapter.get();
    let x = TensorArg::new(x, "cpu_lora_add: x")?;
    let y = TensorArg::new(y, "cpu_lora_add: y")?;
    let [a, b] = adapter.tensors();
    no_overlap(&[&y], &[&x, a, b])?;
    let (az, bz, shape, scaling) = adapter.parts()?;
    let rows = x.len / shape.in_features;
    let shape = LoraShape { rows, ..shape };
    let xs = x.float_slice()?;
    // SAFETY: y overlaps no input (checked above).
    let ys = unsafe { y.float_slice_mut()? };
    py.detach(|| lora::lora_add(xs, az, bz, scaling, shape, ys, isa, Host::Native)).map_err(to_pyerr)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LoraAdapter>()?;
    m.add_function(wrap_pyfunction!(cpu_lora_add, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rotary, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_attend_one_token, m)?)?;
    Ok(())
}
