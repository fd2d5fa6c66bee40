//! Bindings of checkpoint conversion and inspection (`qlora_rs.convert` is the Python API).
//!
//! The work runs with the GIL released. The progress callback re-acquires it briefly after each
//! tensor, which is also where a pending Ctrl-C (or an exception raised by the callback) is
//! noticed: the conversion then stops, removes its temporary output, and the exception propagates.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::to_pyerr;
use crate::convert::{self, CompareRow, ConvertOptions, InspectRow, Plan, Progress, Summary};
use crate::{DType, QuantType};

#[allow(clippy::too_many_arguments)]
fn options(
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
) -> PyResult<ConvertOptions> {
    let opts = ConvertOptions {
        quant_type: QuantType::parse(quant_type).map_err(to_pyerr)?,
        blocksize,
        double_quant,
        compute_dtype: DType::parse(compute_dtype).map_err(to_pyerr)?,
        include,
        exclude,
        threads,
        force,
        allow_nonfinite,
        sync,
    };
    opts.validate().map_err(to_pyerr)?;
    Ok(opts)
}

/// Calls the Python progress callback (if any) and checks for signals; returns false (and
/// stores the exception) to cancel.
fn report(progress: &Option<Py<PyAny>>, failure: &Mutex<Option<PyErr>>, p: &Progress<'_>) -> bool {
    Python::attach(|py| {
        let result = py.check_signals().and_then(|_| match progress {
            Some(cb) => cb
                .bind(py)
                .call1((p.bytes_done, p.bytes_total, p.tensors_done, p.tensors_total, p.tensor))
                .map(|_| ()),
            None => Ok(()),
        });
        match result {
            Ok(()) => true,
            Err(e) => {
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                false
            }
        }
    })
}

fn take_failure(failure: Mutex<Option<PyErr>>, err: crate::Error) -> PyErr {
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => e,
        None => to_pyerr(err),
    }
}

fn paths(py: Python<'_>, v: &[PathBuf]) -> PyResult<Py<PyList>> {
    Ok(PyList::new(py, v.iter().map(|p| p.to_string_lossy().into_owned()))?.unbind())
}

fn summary_dict<'py>(py: Python<'py>, s: &Summary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("dst", s.dst.to_string_lossy().into_owned())?;
    d.set_item("tensors_quantized", s.tensors_quantized)?;
    d.set_item("tensors_kept", s.tensors_kept)?;
    d.set_item("params_quantized", s.params_quantized)?;
    d.set_item("params_kept", s.params_kept)?;
    d.set_item("bytes_in", s.bytes_in)?;
    d.set_item("bytes_out", s.bytes_out)?;
    d.set_item("bytes_out_quantized", s.bytes_out_quantized)?;
    d.set_item("shards", s.shards)?;
    d.set_item("files_copied", paths(py, &s.files_copied)?)?;
    d.set_item("files_skipped", paths(py, &s.files_skipped)?)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

fn plan_dict<'py>(py: Python<'py>, plan: &Plan) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("dst", plan.dst.to_string_lossy().into_owned())?;
    d.set_item("single_file", plan.single_file)?;
    d.set_item("dst_exists", plan.dst_exists)?;
    let shards: Vec<String> =
        plan.checkpoint.source.shards.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let tensors = PyList::empty(py);
    for t in &plan.tensors {
        let r = PyDict::new(py);
        r.set_item("name", &t.name)?;
        r.set_item("shard", &shards[t.shard])?;
        r.set_item("dtype", t.dtype.name())?;
        r.set_item("shape", t.shape.clone())?;
        r.set_item("quantize", t.quantize)?;
        r.set_item("reason", &t.reason)?;
        r.set_item("numel", t.numel())?;
        r.set_item("bytes_in", t.bytes_in)?;
        r.set_item("bytes_out", t.bytes_out)?;
        tensors.append(r)?;
    }
    d.set_item("tensors", tensors)?;
    d.set_item("copy_files", paths(py, &plan.copy_files)?)?;
    d.set_item("skipped_files", paths(py, &plan.skipped_files)?)?;
    d.set_item("skip_modules", plan.skip_modules.clone())?;
    Ok(d)
}

/// Converts a safetensors checkpoint to bitsandbytes 4-bit; returns the summary as a dict.
#[pyfunction]
#[pyo3(signature = (src, dst, quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, progress=None))]
#[allow(clippy::too_many_arguments)]
fn convert_checkpoint<'py>(
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
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync)?;
    let failure = Mutex::new(None);
    let result = py.detach(|| {
        let start = Instant::now();
        let plan = convert::plan(&src, dst.as_deref(), &opts)?;
        convert::execute(&plan, &mut |p| report(&progress, &failure, p), start)
    });
    match result {
        Ok(s) => summary_dict(py, &s),
        Err(e) => Err(take_failure(failure, e)),
    }
}

/// The plan of a conversion (what `--dry-run` prints); reads headers only, writes nothing.
#[pyfunction]
#[pyo3(signature = (src, dst, quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync))]
#[allow(clippy::too_many_arguments)]
fn plan_checkpoint<'py>(
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
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync)?;
    let plan = py.detach(|| convert::plan(&src, dst.as_deref(), &opts)).map_err(to_pyerr)?;
    plan_dict(py, &plan)
}

fn inspect_dict<'py>(py: Python<'py>, r: &InspectRow) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &r.name)?;
    d.set_item("shard", &r.shard)?;
    d.set_item("shape", r.shape.clone())?;
    d.set_item("stored_dtype", &r.stored_dtype)?;
    d.set_item("dtype", &r.dtype)?;
    d.set_item("numel", r.numel)?;
    d.set_item("bytes", r.bytes)?;
    match &r.quant {
        Some(q) => {
            d.set_item("quant_type", q.quant_type.name())?;
            d.set_item("blocksize", q.blocksize)?;
            d.set_item("double_quant", q.nested_offset.is_some())?;
        }
        None => {
            d.set_item("quant_type", py.None())?;
            d.set_item("blocksize", py.None())?;
            d.set_item("double_quant", false)?;
        }
    }
    Ok(d)
}

/// Per-tensor rows of a checkpoint (4-bit weights grouped with their quantization state).
#[pyfunction]
fn inspect_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyList>> {
    let rows = py.detach(|| convert::inspect(&path)).map_err(to_pyerr)?;
    let out = PyList::empty(py);
    for r in &rows {
        out.append(inspect_dict(py, r)?)?;
    }
    Ok(out)
}

fn compare_dict<'py>(py: Python<'py>, r: &CompareRow) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &r.name)?;
    d.set_item("shape", r.shape.clone())?;
    d.set_item("quant_type", r.quant_type.clone())?;
    d.set_item("numel", r.numel)?;
    d.set_item("signal", r.signal)?;
    d.set_item("noise", r.noise)?;
    d.set_item("decoded", r.decoded)?;
    d.set_item("dot", r.dot)?;
    d.set_item("max_abs", r.max_abs)?;
    d.set_item("status", &r.status)?;
    Ok(d)
}

/// Decodes the 4-bit weights of `dst` and compares them with `src` (sums for SQNR and cosine).
#[pyfunction]
#[pyo3(signature = (dst, src, progress=None))]
fn compare_checkpoints<'py>(py: Python<'py>, dst: PathBuf, src: PathBuf, progress: Option<Py<PyAny>>) -> PyResult<Bound<'py, PyList>> {
    let failure = Mutex::new(None);
    let result = py.detach(|| convert::compare(&dst, &src, &mut |p| report(&progress, &failure, p)));
    let rows = result.map_err(|e| take_failure(failure, e))?;
    let out = PyList::empty(py);
    for r in &rows {
        out.append(compare_dict(py, r)?)?;
    }
    Ok(out)
}

/// `json.dumps(float(x))` as the converter writes it into quantization state (for tests).
#[pyfunction]
fn python_float_repr(x: f64) -> String {
    convert::python_float_repr(x)
}

/// The default output path for a source (`<dir>-nf4`, `<stem>-nf4`).
#[pyfunction]
fn default_destination(src: PathBuf, quant_type: &str) -> PyResult<String> {
    let qt = QuantType::parse(quant_type).map_err(to_pyerr)?;
    Ok(convert::default_destination(&src, qt).to_string_lossy().into_owned())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(convert_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(plan_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(compare_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(python_float_repr, m)?)?;
    m.add_function(wrap_pyfunction!(default_destination, m)?)?;
    Ok(())
}
