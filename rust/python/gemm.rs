//! Bindings of the CPU kernels over packed 4-bit weights (`crate::matmul4`, and the decode of
//! `crate::quant4` with double quantization) and of the instruction-set dispatch
//! (`crate::cpu_isa`). A packed weight is checked once into a [`PackedWeight4`], which holds its
//! tensors; each call then reads only the activations and the output through DLPack.

use std::cell::RefCell;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use super::tensor_arg::{no_overlap, Elem, HeldTensor, TensorArg};
use super::decode::LoraAdapter;
use super::to_pyerr;
use crate::cpu_isa::{Host, Isa};
use crate::matmul4::{self, Weight4};
use crate::quant4::{self, BlockScales, OutputMemory};
use crate::{blockwise8, QuantType};

enum HeldScales {
    F32(HeldTensor),
    Double { codes: HeldTensor, nested_absmax: HeldTensor, nested_code: HeldTensor, offset: f32 },
}

/// A packed 4-bit weight of `rows` x `cols` on the CPU, its tensors checked once (device, dtype,
/// contiguity, lengths) and held for the object's lifetime.
///
/// ``packed``: uint8, (rows * cols + 1) // 2 bytes. ``absmax``: float32 per block, or with
/// ``nested_absmax`` (float32 per 256 blocks) and ``nested_code`` (256 float32) uint8 codes
/// decoded as ``nested_code[q] * nested_absmax[b // 256] + offset``. Each tensor may be passed
/// as a tensor or a DLPack capsule.
#[pyclass(name = "PackedWeight4", module = "qlora_rs._lib", frozen)]
pub(super) struct PackedWeight4 {
    packed: HeldTensor,
    scales: HeldScales,
    quant_type: QuantType,
    blocksize: usize,
    rows: usize,
    cols: usize,
}

#[pymethods]
impl PackedWeight4 {
    #[new]
    #[pyo3(signature = (packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, rows, cols))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        packed: &Bound<'_, PyAny>,
        absmax: &Bound<'_, PyAny>,
        nested_absmax: Option<&Bound<'_, PyAny>>,
        nested_code: Option<&Bound<'_, PyAny>>,
        offset: f32,
        quant_type: &str,
        blocksize: usize,
        rows: usize,
        cols: usize,
    ) -> PyResult<Self> {
        let quant_type = QuantType::parse(quant_type).map_err(to_pyerr)?;
        quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
        let n = rows.checked_mul(cols).ok_or_else(|| to_pyerr(crate::Error::shape("PackedWeight4: rows * cols overflows")))?;
        let blocks = quant4::num_blocks(n, blocksize);
        let packed = TensorArg::new(packed, "PackedWeight4: packed")?.expect_of(Elem::U8, quant4::packed_len(n))?;
        let absmax = TensorArg::new(absmax, "PackedWeight4: absmax")?;
        let nested_absmax = TensorArg::optional(nested_absmax, "PackedWeight4: nested_absmax")?;
        let nested_code = TensorArg::optional(nested_code, "PackedWeight4: nested_code")?;
        let scales = match (nested_absmax, nested_code) {
            (None, None) => HeldScales::F32(HeldTensor(absmax.expect_of(Elem::F32, blocks)?)),
            (Some(nested_absmax), Some(nested_code)) => HeldScales::Double {
                codes: HeldTensor(absmax.expect_of(Elem::U8, blocks)?),
                nested_absmax: HeldTensor(nested_absmax.expect_of(Elem::F32, blockwise8::nested_blocks(blocks))?),
                nested_code: HeldTensor(nested_code.expect_of(Elem::F32, 256)?),
                offset,
            },
            _ => {
                return Err(to_pyerr(crate::Error::unsupported(
                    "double quantization needs both nested_absmax and nested_code (or neither)",
                )))
            }
        };
        Ok(PackedWeight4 { packed: HeldTensor(packed), scales, quant_type, blocksize, rows, cols })
    }

    /// Output features (rows of the weight).
    #[getter]
    fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of the weight).
    #[getter]
    fn cols(&self) -> usize {
        self.cols
    }
}

impl PackedWeight4 {
    fn weight(&self) -> PyResult<Weight4<'_>> {
        let scales = match &self.scales {
            HeldScales::F32(a) => BlockScales::F32(a.0.slice()?),
            HeldScales::Double { codes, nested_absmax, nested_code, offset } => BlockScales::Double {
                codes: codes.0.slice()?,
                nested_absmax: nested_absmax.0.slice()?,
                nested_map: nested_code.0.slice::<f32>()?.try_into().map_err(|_| shape_err("nested_code: expected 256 values".into()))?,
                offset: *offset,
            },
        };
        Ok(Weight4 {
            packed: self.packed.0.slice()?,
            scales,
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            rows: self.rows,
            cols: self.cols,
        })
    }

    /// The held tensors, for overlap checks against an output.
    fn tensors(&self) -> [Option<&TensorArg>; 4] {
        match &self.scales {
            HeldScales::F32(a) => [Some(&self.packed.0), Some(&a.0), None, None],
            HeldScales::Double { codes, nested_absmax, nested_code, .. } => {
                [Some(&self.packed.0), Some(&codes.0), Some(&nested_absmax.0), Some(&nested_code.0)]
            }
        }
    }

    fn check_out(&self, out: &TensorArg, inputs: &[&TensorArg]) -> PyResult<()> {
        let held = self.tensors();
        let mut all: Vec<&TensorArg> = held.iter().flatten().copied().collect();
        all.extend_from_slice(inputs);
        no_overlap(&[out], &all)
    }
}

fn isa_or_current(isa: Option<&str>) -> PyResult<Isa> {
    match isa {
        Some(name) => Isa::parse(name),
        None => Isa::current(),
    }
    .map_err(to_pyerr)
}

fn shape_err(msg: String) -> PyErr {
    to_pyerr(crate::Error::shape(msg))
}

/// Fused out[m, n] = x[m, k] @ dequant(W[n, k])^T on the CPU, never decoding W to memory. `x`
/// (float32, float16 or bfloat16, m * k elements) and `out` (the same dtype, m * n elements):
/// tensors or DLPack capsules. `isa`: a level from `cpu_isas()` (default: `cpu_isa()`).
#[pyfunction]
#[pyo3(signature = (weight, x, out, isa=None))]
fn cpu_gemm_4bit(
    py: Python<'_>,
    weight: &Bound<'_, PackedWeight4>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    isa: Option<&str>,
) -> PyResult<()> {
    let x = TensorArg::new(x, "cpu_gemm_4bit: x")?;
    let out = TensorArg::new(out, "cpu_gemm_4bit: out")?;
    products(py, "cpu_gemm_4bit", &[weight.get()], x, vec![out], isa)
}

/// The products of one `x` with several weights of the same in_features in one call:
/// `outs[i] = x @ dequant(weights[i])^T`, each the same as `cpu_gemm_4bit(weights[i], x, outs[i])`
/// gives, with the activations converted once and the rows of all the weights shared among the
/// threads (a layer's query, key and value projections, or its gate and up projections).
#[pyfunction]
#[pyo3(signature = (weights, x, outs, isa=None))]
fn cpu_gemm_4bit_group(
    py: Python<'_>,
    weights: Vec<Bound<'_, PackedWeight4>>,
    x: &Bound<'_, PyAny>,
    outs: Vec<Bound<'_, PyAny>>,
    isa: Option<&str>,
) -> PyResult<()> {
    if weights.is_empty() || weights.len() != outs.len() {
        return Err(shape_err(format!(
            "cpu_gemm_4bit_group: {} weights and {} outputs; expected one output per weight, at least one",
            weights.len(),
            outs.len()
        )));
    }
    let ws: Vec<&PackedWeight4> = weights.iter().map(|w| w.get()).collect();
    let x = TensorArg::new(x, "cpu_gemm_4bit_group: x")?;
    let outs = outs.iter().map(|o| TensorArg::new(o, "cpu_gemm_4bit_group: out")).collect::<PyResult<Vec<_>>>()?;
    products(py, "cpu_gemm_4bit_group", &ws, x, outs, isa)
}

/// `outs[i] = x @ dequant(ws[i])^T` (one weight or several of the same in_features): checks x
/// and each output (length, dtype, overlap with x, the other outputs and every weight's tensors),
/// then runs the kernel. `name` prefixes the errors; with several weights they number the outputs.
fn products(py: Python<'_>, name: &str, ws: &[&PackedWeight4], x: TensorArg, outs: Vec<TensorArg>, isa: Option<&str>) -> PyResult<()> {
    let isa = isa_or_current(isa)?;
    let k = ws[0].cols;
    let label = |i: usize| if ws.len() == 1 { "out".to_string() } else { format!("out {i}") };
    // m from x, or from an output when the weights have no columns.
    let m = x.len.checked_div(k).unwrap_or_else(|| outs.iter().zip(ws).find_map(|(o, w)| o.len.checked_div(w.rows)).unwrap_or(0));
    if x.len != m * k {
        return Err(shape_err(format!("{name}: x has {} elements, not a multiple of in_features {k}", x.len)));
    }
    for (i, (w, out)) in ws.iter().zip(&outs).enumerate() {
        if w.cols != k {
            return Err(shape_err(format!("{name}: weight {i} has in_features {}, weight 0 {k}", w.cols)));
        }
        if out.len != m * w.rows {
            return Err(shape_err(format!(
                "{name}: {} has {} elements, expected {m} x {} = {}",
                label(i),
                out.len,
                w.rows,
                m * w.rows
            )));
        }
        if out.elem != x.elem {
            return Err(shape_err(format!("{name}: {} is {}, expected x's dtype {}", label(i), out.elem.name(), x.elem.name())));
        }
        let mut inputs: Vec<&TensorArg> = vec![&x];
        inputs.extend(outs.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, o)| o));
        for other in ws {
            other.check_out(out, &inputs)?;
        }
    }
    let weights = ws.iter().map(|w| w.weight()).collect::<PyResult<Vec<_>>>()?;
    let xs = x.float_slice()?;
    // SAFETY: each out overlaps neither x, the other outs nor the weights' tensors (checked above).
    let os = outs.iter().map(|o| unsafe { o.float_slice_mut() }).collect::<PyResult<Vec<_>>>()?;
    run_kernel(py, isa, |host| matmul4::gemm_4bit_group_on(xs, m, &weights, os, isa, host))
}

/// A held LoRA adapter (or none) of projection `name` of weight `w`, for a call that writes `out`:
/// checked not to overlap `out` and to fit the projection (`caller` prefixes the error).
fn adapter_for<'a>(
    caller: &str,
    entry: Option<&'a Bound<'_, LoraAdapter>>,
    out: &TensorArg,
    name: &str,
    w: &Weight4<'_>,
) -> PyResult<Option<matmul4::Adapter<'a>>> {
    let Some(adapter) = entry else { return Ok(None) };
    let adapter = adapter.get();
    no_overlap(&[out], &adapter.tensors())?;
    let (a, b, shape, scaling) = adapter.parts()?;
    if (shape.in_features, shape.out_features) != (w.cols, w.rows) {
        return Err(shape_err(format!(
            "{caller}: {name}'s adapter is for [{}, {}] (out x in); the projection is [{}, {}]",
            shape.out_features, shape.in_features, w.rows, w.cols
        )));
    }
    Ok(Some(matmul4::Adapter { a, b, rank: shape.rank, scaling }))
}

/// `out = down(act(gate(x)) * up(x))` in one call (transformers' `LlamaMLP` with `activation`
/// `"silu"`, `GemmaMLP` with `"gelu_tanh"`, 4-bit projections, rounded as PyTorch computes it in
/// x's dtype): `x` `[m, in]`, `out` `[m, out]`. `adapters`: None, or one entry per projection
/// (gate, up, down), None or a `LoraAdapter` whose share is added to that projection's product as
/// `cpu_lora_add` adds it.
#[pyfunction]
#[pyo3(signature = (gate, up, down, x, out, isa=None, adapters=None, activation="silu"))]
#[allow(clippy::too_many_arguments)]
fn cpu_gated_mlp_4bit(
    py: Python<'_>,
    gate: &Bound<'_, PackedWeight4>,
    up: &Bound<'_, PackedWeight4>,
    down: &Bound<'_, PackedWeight4>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    isa: Option<&str>,
    adapters: Option<Vec<Option<Bound<'_, LoraAdapter>>>>,
    activation: &str,
) -> PyResult<()> {
    let isa = isa_or_current(isa)?;
    let act = matmul4::GateActivation::from_name(activation).map_err(to_pyerr)?;
    let (g, u, d) = (gate.get(), up.get(), down.get());
    let x = TensorArg::new(x, "cpu_gated_mlp_4bit: x")?;
    let out = TensorArg::new(out, "cpu_gated_mlp_4bit: out")?;
    let k = g.cols;
    if k == 0 || x.len % k != 0 {
        return Err(shape_err(format!("cpu_gated_mlp_4bit: x has {} elements, not rows of in_features {k}", x.len)));
    }
    let m = x.len / k;
    if out.len != m * d.rows || out.elem != x.elem {
        return Err(shape_err(format!(
            "cpu_gated_mlp_4bit: out is {} of {} elements, expected x's dtype {} and {m} x {} = {}",
            out.elem.name(),
            out.len,
            x.elem.name(),
            d.rows,
            m * d.rows
        )));
    }
    let adapters = adapters.unwrap_or_else(|| vec![None, None, None]);
    if adapters.len() != 3 {
        return Err(shape_err(format!("cpu_gated_mlp_4bit: {} adapters; expected one entry (or None) for each of gate, up, down", adapters.len())));
    }
    for w in [g, u, d] {
        w.check_out(&out, &[&x])?;
    }
    let (gw, uw, dw) = (g.weight()?, u.weight()?, d.weight()?);
    let lora = [
        adapter_for("cpu_gated_mlp_4bit", adapters[0].as_ref(), &out, "gate", &gw)?,
        adapter_for("cpu_gated_mlp_4bit", adapters[1].as_ref(), &out, "up", &uw)?,
        adapter_for("cpu_gated_mlp_4bit", adapters[2].as_ref(), &out, "down", &dw)?,
    ];
    let xs = x.float_slice()?;
    // SAFETY: out overlaps neither x, the weights' tensors nor the adapters (checked above).
    let os = unsafe { out.float_slice_mut()? };
    run_kernel(py, isa, |host| matmul4::gated_mlp_4bit_on(xs, m, &gw, &uw, &dw, act, lora, os, isa, host))
}

/// What follows the attention in a decoder layer of Llama's form, in one call:
/// `out = h + mlp(norm(h))` with `h = residual + o_proj(attended)` (`matmul4::decoder_tail_on`:
/// each step rounded as PyTorch rounds the layer's forward). `attended` `[m, o.cols]`, `residual`
/// and `out` `[m, o.rows]`, `norm_weight` `[o.rows]`, one float dtype; `o_bias` (any float dtype)
/// and `o_adapter` what the output projection adds to its product; the norm in Gemma's style with
/// `unit_offset`; `gate`, `up`, `down`, `mlp_adapters` and `activation` as `cpu_gated_mlp_4bit`
/// takes them. `post_norms`: Gemma3's form, `(post-attention weight, post-MLP weight)` of the
/// norms of the attention's and the MLP's outputs (the same epsilon and style), `norm_weight` then
/// its pre-MLP norm's.
#[pyfunction]
#[pyo3(signature = (attended, o, o_bias, o_adapter, residual, norm_weight, eps, unit_offset, gate, up, down, mlp_adapters,
                    activation, out, isa=None, post_norms=None))]
#[allow(clippy::too_many_arguments)]
fn cpu_decoder_tail(
    py: Python<'_>,
    attended: &Bound<'_, PyAny>,
    o: &Bound<'_, PackedWeight4>,
    o_bias: Option<&Bound<'_, PyAny>>,
    o_adapter: Option<Bound<'_, LoraAdapter>>,
    residual: &Bound<'_, PyAny>,
    norm_weight: &Bound<'_, PyAny>,
    eps: f32,
    unit_offset: bool,
    gate: &Bound<'_, PackedWeight4>,
    up: &Bound<'_, PackedWeight4>,
    down: &Bound<'_, PackedWeight4>,
    mlp_adapters: Option<Vec<Option<Bound<'_, LoraAdapter>>>>,
    activation: &str,
    out: &Bound<'_, PyAny>,
    isa: Option<&str>,
    post_norms: Option<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
) -> PyResult<()> {
    let isa = isa_or_current(isa)?;
    let act = matmul4::GateActivation::from_name(activation).map_err(to_pyerr)?;
    let attended = TensorArg::new(attended, "cpu_decoder_tail: attended")?;
    let post = match &post_norms {
        Some((a, m)) => Some([
            TensorArg::new(a, "cpu_decoder_tail: post-attention norm weight")?,
            TensorArg::new(m, "cpu_decoder_tail: post-MLP norm weight")?,
        ]),
        None => None,
    };
    let o_bias = TensorArg::optional(o_bias, "cpu_decoder_tail: o_bias")?;
    let residual = TensorArg::new(residual, "cpu_decoder_tail: residual")?;
    let norm_weight = TensorArg::new(norm_weight, "cpu_decoder_tail: norm_weight")?;
    let out = TensorArg::new(out, "cpu_decoder_tail: out")?;
    let (o, g, u, d) = (o.get(), gate.get(), up.get(), down.get());
    if o.cols == 0 || attended.len % o.cols != 0 {
        return Err(shape_err(format!(
            "cpu_decoder_tail: attended has {} elements, not rows of the output projection's in_features {}",
            attended.len, o.cols
        )));
    }
    let m = attended.len / o.cols;
    let mlp_adapters = mlp_adapters.unwrap_or_else(|| vec![None, None, None]);
    if mlp_adapters.len() != 3 {
        return Err(shape_err(format!(
            "cpu_decoder_tail: {} MLP adapters; expected one entry (or None) for each of gate, up, down",
            mlp_adapters.len()
        )));
    }
    let mut inputs = vec![&attended, &residual, &norm_weight];
    inputs.extend(o_bias.as_ref());
    inputs.extend(post.iter().flatten());
    for w in [o, g, u, d] {
        w.check_out(&out, &inputs)?;
    }
    let (ow, gw, uw, dw) = (o.weight()?, g.weight()?, u.weight()?, d.weight()?);
    let projection = matmul4::Projection {
        weight: ow,
        bias: match &o_bias {
            Some(b) => Some(b.float_slice()?),
            None => None,
        },
        adapter: adapter_for("cpu_decoder_tail", o_adapter.as_ref(), &out, "o_proj", &ow)?,
    };
    let mlp_lora = [
        adapter_for("cpu_decoder_tail", mlp_adapters[0].as_ref(), &out, "gate", &gw)?,
        adapter_for("cpu_decoder_tail", mlp_adapters[1].as_ref(), &out, "up", &uw)?,
        adapter_for("cpu_decoder_tail", mlp_adapters[2].as_ref(), &out, "down", &dw)?,
    ];
    let style = if unit_offset { crate::decode::NormStyle::Gemma } else { crate::decode::NormStyle::Llama };
    let norms = matmul4::TailNorms {
        mlp: norm_weight.float_slice()?,
        post: match &post {
            Some([a, m]) => Some([a.float_slice()?, m.float_slice()?]),
            None => None,
        },
        eps,
        style,
    };
    let (xs, rs) = (attended.float_slice()?, residual.float_slice()?);
    // SAFETY: out overlaps no input, weight or adapter (checked above).
    let os = unsafe { out.float_slice_mut()? };
    run_kernel(py, isa, |host| matmul4::decoder_tail_on(xs, m, &projection, rs, &norms, [&gw, &uw, &dw], act, mlp_lora, os, isa, host))
}

/// Decodes the weight into `out` (float32, float16 or bfloat16, rows * cols elements) on the CPU,
/// decoding double-quantized scales chunk by chunk (no float32 copy). `isa`: a level from
/// `cpu_isas()` (default: `cpu_isa()`). `fresh`: `out` was just allocated for this call (its
/// pages untouched: written through the cache; else large outputs are streamed past it).
#[pyfunction]
#[pyo3(signature = (weight, out, isa=None, fresh=false))]
fn cpu_dequantize_4bit(
    py: Python<'_>,
    weight: &Bound<'_, PackedWeight4>,
    out: &Bound<'_, PyAny>,
    isa: Option<&str>,
    fresh: bool,
) -> PyResult<()> {
    let w = weight.get();
    let isa = isa_or_current(isa)?;
    let out = TensorArg::new(out, "cpu_dequantize_4bit: out")?.expect_len(w.rows * w.cols)?;
    w.check_out(&out, &[])?;
    out.advise_huge_pages();
    let weight = w.weight()?;
    let memory = if fresh { OutputMemory::Fresh } else { OutputMemory::Touched };
    // SAFETY: out overlaps none of the weight's tensors (checked above).
    let os = unsafe { out.float_slice_mut()? };
    run_kernel(py, isa, |host| {
        quant4::dequantize_4bit_into(weight.packed, weight.scales, weight.quant_type, weight.blocksize, os, isa, memory, host)
    })
}

thread_local! {
    /// This thread's CPU emulator (`set_cpu_emulator`).
    static EMULATOR: RefCell<Option<Py<PyAny>>> = const { RefCell::new(None) };
}

/// Runs a kernel call here, or on this thread's CPU emulator when this CPU lacks the level and
/// an emulator is installed.
fn run_kernel<F>(py: Python<'_>, isa: Isa, call: F) -> PyResult<()>
where
    F: FnOnce(Host) -> crate::Result<()> + Send,
{
    if !isa.is_supported() {
        if let Some(emulator) = EMULATOR.with(|e| e.borrow().as_ref().map(|e| e.clone_ref(py))) {
            let mut call = Some(call);
            return emulate(py, &emulator, isa, &mut || match call.take() {
                Some(call) => call(Host::Emulated),
                None => Err(crate::Error::unsupported("the CPU emulator ran one kernel call twice")),
            });
        }
    }
    py.detach(|| call(Host::Native)).map_err(to_pyerr)
}

/// A kernel call handed to a CPU emulator, which runs `run_job(job)`.
struct Job<'a> {
    call: &'a mut dyn FnMut() -> crate::Result<()>,
    result: Option<crate::Result<()>>,
}

/// Where the emulator starts (System V calling convention: the job's address in rdi).
extern "C" fn run_job(job: *mut Job<'_>) {
    // SAFETY: `emulate` passes a job that outlives the emulator's run.
    let job = unsafe { &mut *job };
    job.result = Some((job.call)());
}

fn emulate(py: Python<'_>, emulator: &Py<PyAny>, isa: Isa, call: &mut dyn FnMut() -> crate::Result<()>) -> PyResult<()> {
    let mut job = Job { call, result: None };
    let entry = run_job as extern "C" fn(*mut Job<'_>) as usize;
    emulator.call1(py, (isa.name(), entry, &mut job as *mut Job<'_> as usize))?;
    match job.result.take() {
        Some(result) => result.map_err(to_pyerr),
        None => Err(PyRuntimeError::new_err(format!(
            "the CPU emulator returned without finishing the {:?} kernel call",
            isa.name()
        ))),
    }
}

/// Installs `emulator` for this thread and returns the one it replaces: from then on the
/// cpu_* kernels run a level this CPU lacks by calling ``emulator(isa, entry, job)``, which
/// must run the machine code at address ``entry`` with ``job`` as its one argument (System V
/// ABI) on an emulated CPU that has the level ``isa``, over this process's memory, and return
/// when that call returns. The call runs on one thread and makes no system calls other than
/// memory allocation's. For the tests: they run the AVX-512 kernels this way on CPUs without
/// them. ``None`` uninstalls.
#[pyfunction]
fn set_cpu_emulator(emulator: Option<Py<PyAny>>) -> Option<Py<PyAny>> {
    EMULATOR.with(|e| std::mem::replace(&mut *e.borrow_mut(), emulator))
}

/// The instruction-set level the CPU kernels use in this process: the widest this CPU runs,
/// capped by the environment variable QLORA_RS_CPU_ISA (read once).
#[pyfunction]
fn cpu_isa() -> PyResult<&'static str> {
    Ok(Isa::current().map_err(to_pyerr)?.name())
}

/// The instruction-set levels this CPU runs, widest first ("avx512bf16", "avx512", "avx2",
/// "portable"); each can be passed as `isa` to the cpu_* kernels.
#[pyfunction]
fn cpu_isas() -> Vec<&'static str> {
    Isa::available().into_iter().map(Isa::name).collect()
}

/// Whether bfloat16 activations at the "avx512bf16" level multiply the weight rounded to
/// bfloat16 (`vdpbf16ps`) rather than the float32 weight: by default on CPUs without AMX;
/// QLORA_RS_BF16_PRODUCTS=1 or 0 decides instead (read once).
#[pyfunction]
fn cpu_bf16_products() -> PyResult<bool> {
    crate::cpu_isa::bf16_products().map_err(to_pyerr)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PackedWeight4>()?;
    m.add_function(wrap_pyfunction!(cpu_bf16_products, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gemm_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gemm_4bit_group, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gated_mlp_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_decoder_tail, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isas, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_emulator, m)?)?;
    Ok(())
}
