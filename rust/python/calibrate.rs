//! Bindings of calibrated 4-bit quantization (`qlora_rs.calibrate` is the Python API): the Hessian
//! factor, the column sweep, and the conversion that writes precomputed 4-bit weights.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{options, run_conversion};
use super::tensor_arg::{no_overlap, Elem, TensorArg};
use super::to_pyerr;
use crate::calibrate::{self, CalibrateOptions, HessianFactor, ScalesOut};
use crate::convert::PrecomputedWeight;
use crate::error::Error;
use crate::{blockwise8, quant4, QuantType};

/// Factors the damped Hessian: reads `h` (float64, n x n), writes `u` (float32, n x n, upper
/// triangular, `Uᵀ U = (H + λI)⁻¹`). Returns `{"damp", "dead_columns", "damp_raised"}`.
#[pyfunction]
#[pyo3(signature = (h, n, relative_damp, u))]
fn hessian_factor<'py>(
    py: Python<'py>,
    h: &Bound<'py, PyAny>,
    n: usize,
    relative_damp: f64,
    u: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let nn = n.checked_mul(n).ok_or_else(|| to_pyerr(Error::shape("hessian_factor: n * n overflows")))?;
    let h = TensorArg::new(h, "hessian_factor: h")?.expect_of(Elem::F64, nn)?;
    let u = TensorArg::new(u, "hessian_factor: u")?.expect_of(Elem::F32, nn)?;
    no_overlap(&[&u], &[&h])?;
    let hs = h.slice::<f64>()?;
    // SAFETY: u overlaps h in no byte (checked above).
    let us = unsafe { u.slice_mut::<f32>()? };
    let f = py
        .detach(|| {
            let f = HessianFactor::new(hs, n, relative_damp)?;
            us.copy_from_slice(f.upper());
            Ok::<_, Error>(f)
        })
        .map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("damp", f.damp)?;
    d.set_item("dead_columns", f.dead_columns)?;
    d.set_item("damp_raised", f.damp_raised)?;
    Ok(d)
}

/// Quantizes the float32 `[rows, cols]` weight `w` with the column sweep against the factor `u`
/// (float32 cols x cols). Writes the packed codes ((n+1)//2 uint8) into `packed` and the scales
/// into `absmax`: float32 per block, or with `double_quant` uint8 per block plus float32 per 256
/// blocks into `nested` (ignored otherwise). Returns `{"offset", "sweep_scales", "loss",
/// "negative_scales"}`.
#[pyfunction]
#[pyo3(signature = (w, rows, cols, u, quant_type, blocksize, double_quant, fixed_scales, packed, absmax, nested))]
#[allow(clippy::too_many_arguments)]
fn calibrate_4bit<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    rows: usize,
    cols: usize,
    u: &Bound<'py, PyAny>,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    fixed_scales: bool,
    packed: &Bound<'py, PyAny>,
    absmax: &Bound<'py, PyAny>,
    nested: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let quant_type = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let opts = CalibrateOptions { quant_type, blocksize, double_quant, fixed_scales };
    let overflow = || to_pyerr(Error::shape("calibrate_4bit: the weight's shape overflows"));
    let n = rows.checked_mul(cols).ok_or_else(overflow)?;
    let blocks = quant4::num_blocks(n, blocksize);
    let w = TensorArg::new(w, "calibrate_4bit: w")?.expect_of(Elem::F32, n)?;
    let u = TensorArg::new(u, "calibrate_4bit: u")?.expect_of(Elem::F32, cols.checked_mul(cols).ok_or_else(overflow)?)?;
    let packed = TensorArg::new(packed, "calibrate_4bit: packed")?.expect_of(Elem::U8, quant4::packed_len(n))?;
    let absmax = TensorArg::new(absmax, "calibrate_4bit: absmax")?
        .expect_of(if double_quant { Elem::U8 } else { Elem::F32 }, blocks)?;
    let nested = TensorArg::new(nested, "calibrate_4bit: nested")?;
    let nested = if double_quant { Some(nested.expect_of(Elem::F32, blockwise8::nested_blocks(blocks))?) } else { None };
    let mut outputs = vec![&packed, &absmax];
    outputs.extend(nested.as_ref());
    no_overlap(&outputs, &[&w, &u])?;
    let (ws, us) = (w.slice::<f32>()?, u.slice::<f32>()?);
    // SAFETY: packed, absmax and nested overlap each other and the inputs in no byte (checked above).
    let (ps, scales) = unsafe {
        let scales = match &nested {
            Some(nested) => ScalesOut::Double { codes: absmax.slice_mut()?, nested: nested.slice_mut()? },
            None => ScalesOut::Float(absmax.slice_mut()?),
        };
        (packed.slice_mut()?, scales)
    };
    let r = py
        .detach(|| {
            let factor = HessianFactor::from_upper(us, cols)?;
            calibrate::calibrate_4bit(ws, rows, cols, &factor, &opts, ps, scales)
        })
        .map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("offset", r.offset)?;
    d.set_item("sweep_scales", r.sweep_scales)?;
    d.set_item("loss", r.loss)?;
    d.set_item("negative_scales", r.negative_scales)?;
    Ok(d)
}

/// One precomputed weight from Python: `(packed, absmax, nested_absmax, offset)`, tensors (or
/// DLPack capsules) whose bytes are copied: packed uint8, absmax float32 or uint8 codes,
/// nested_absmax float32 (empty without double quantization).
type WeightArgs<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Option<f32>);

/// `convert_checkpoint` with some weights computed beforehand (`weights`: tensor name ->
/// [`WeightArgs`]) and `config_extra` (a JSON object) merged into the output config.json.
#[pyfunction]
#[pyo3(signature = (src, dst, quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, weights, config_extra, progress=None, dtype=None, add_files=None))]
#[allow(clippy::too_many_arguments)]
fn convert_calibrated<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: Option<PathBuf>,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    compute_dtype: &str,
    include: Vec<String>,
    exclude: Vec<String>,
    threads: Option<usize>,
    force: bool,
    allow_nonfinite: bool,
    sync: bool,
    weights: HashMap<String, WeightArgs<'py>>,
    config_extra: &str,
    progress: Option<Py<PyAny>>,
    dtype: Option<&str>,
    add_files: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(
        quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, dtype,
        false,
    )?;
    let extra = match serde_json::from_str(config_extra) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(to_pyerr(Error::unsupported("config_extra must be a JSON object"))),
    };
    let mut precomputed = HashMap::with_capacity(weights.len());
    for (name, (packed, absmax, nested, offset)) in weights {
        let packed = TensorArg::new(&packed, "convert_calibrated: packed")?.expect(Elem::U8)?;
        let absmax = TensorArg::new(&absmax, "convert_calibrated: absmax")?;
        let nested = TensorArg::new(&nested, "convert_calibrated: nested_absmax")?.expect(Elem::F32)?;
        let w = PrecomputedWeight {
            packed: packed.bytes().to_vec(),
            absmax: absmax.bytes().to_vec(),
            nested_absmax: nested.slice::<f32>()?.to_vec(),
            offset,
        };
        precomputed.insert(name, w);
    }
    run_conversion(py, &src, dst.as_deref(), &opts, progress, add_files, move |plan| {
        if let Some(name) = precomputed.keys().find(|n| !plan.tensors.iter().any(|t| t.quantize && &t.name == *n)) {
            return Err(Error::unsupported(format!(
                "calibrated weight {name:?} is not among the tensors this conversion quantizes"
            )));
        }
        plan.precomputed = precomputed;
        plan.config_extra = extra;
        Ok(())
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hessian_factor, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(convert_calibrated, m)?)?;
    Ok(())
}
