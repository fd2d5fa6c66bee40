//! Bindings of calibrated 4-bit quantization (`qlora_rs.calibrate` is the Python API): the Hessian
//! factor, the column sweep, and the conversion that writes precomputed 4-bit weights.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{options, run_conversion};
use super::quant::{slice, slice_mut};
use super::to_pyerr;
use crate::calibrate::{self, CalibrateOptions, HessianFactor, ScalesOut};
use crate::convert::PrecomputedWeight;
use crate::error::Error;
use crate::{blockwise8, quant4, QuantType};

/// Factors the damped Hessian: reads `H` (float64 n x n at `h_ptr`), writes `U` (float32 n x n,
/// upper triangular, `Uᵀ U = (H + λI)⁻¹`) at `u_ptr`. Returns `{"damp", "dead_columns",
/// "damp_raised"}`.
#[pyfunction]
#[pyo3(signature = (h_ptr, n, relative_damp, u_ptr))]
fn hessian_factor<'py>(py: Python<'py>, h_ptr: usize, n: usize, relative_damp: f64, u_ptr: usize) -> PyResult<Bound<'py, PyDict>> {
    let f = py
        .detach(|| {
            // SAFETY: the caller passes contiguous float64 / float32 tensors of n * n elements.
            let f = HessianFactor::new(unsafe { slice(h_ptr, n * n) }, n, relative_damp)?;
            unsafe { slice_mut::<f32>(u_ptr, n * n) }.copy_from_slice(f.upper());
            Ok::<_, Error>(f)
        })
        .map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("damp", f.damp)?;
    d.set_item("dead_columns", f.dead_columns)?;
    d.set_item("damp_raised", f.damp_raised)?;
    Ok(d)
}

/// Quantizes the float32 `[rows, cols]` weight at `w_ptr` with the column sweep against the
/// factor `U` at `u_ptr` (float32 cols x cols). Writes the packed codes ((n+1)//2 bytes) at
/// `packed_ptr` and the scales at `absmax_ptr`: float32 per block, or with `double_quant` uint8
/// per block plus float32 per 256 blocks at `nested_ptr`. Returns `{"offset", "sweep_scales",
/// "loss", "negative_scales"}`.
#[pyfunction]
#[pyo3(signature = (w_ptr, rows, cols, u_ptr, quant_type, blocksize, double_quant, fixed_scales, packed_ptr, absmax_ptr, nested_ptr))]
#[allow(clippy::too_many_arguments)]
fn calibrate_4bit<'py>(
    py: Python<'py>,
    w_ptr: usize,
    rows: usize,
    cols: usize,
    u_ptr: usize,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    fixed_scales: bool,
    packed_ptr: usize,
    absmax_ptr: usize,
    nested_ptr: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let quant_type = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let opts = CalibrateOptions { quant_type, blocksize, double_quant, fixed_scales };
    let n = rows * cols;
    let blocks = quant4::num_blocks(n, blocksize);
    let r = py
        .detach(|| {
            // SAFETY: the caller allocates every buffer with the sizes computed here.
            let factor = HessianFactor::from_upper(unsafe { slice(u_ptr, cols * cols) }, cols)?;
            let scales = if double_quant {
                ScalesOut::Double {
                    codes: unsafe { slice_mut(absmax_ptr, blocks) },
                    nested: unsafe { slice_mut(nested_ptr, blockwise8::nested_blocks(blocks)) },
                }
            } else {
                ScalesOut::Float(unsafe { slice_mut(absmax_ptr, blocks) })
            };
            calibrate::calibrate_4bit(
                unsafe { slice(w_ptr, n) },
                rows,
                cols,
                &factor,
                &opts,
                unsafe { slice_mut(packed_ptr, quant4::packed_len(n)) },
                scales,
            )
        })
        .map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("offset", r.offset)?;
    d.set_item("sweep_scales", r.sweep_scales)?;
    d.set_item("loss", r.loss)?;
    d.set_item("negative_scales", r.negative_scales)?;
    Ok(d)
}

/// One precomputed weight from Python: `(packed_ptr, packed_len, absmax_ptr, absmax_bytes,
/// nested_ptr, nested_len, offset)`; the caller keeps the tensors alive for the call.
type WeightArgs = (usize, usize, usize, usize, usize, usize, Option<f32>);

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
    weights: HashMap<String, WeightArgs>,
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
    let precomputed: HashMap<String, PrecomputedWeight> = weights
        .into_iter()
        .map(|(name, (p, pl, a, al, nptr, nl, offset))| {
            // SAFETY: the pointers come from contiguous CPU tensors of these sizes, alive for the call.
            let w = unsafe {
                PrecomputedWeight {
                    packed: slice::<u8>(p, pl).to_vec(),
                    absmax: slice::<u8>(a, al).to_vec(),
                    nested_absmax: slice::<f32>(nptr, nl).to_vec(),
                    offset,
                }
            };
            (name, w)
        })
        .collect();
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
