//! Bindings of checkpoint conversion and inspection (`qlora_rs.io.convert` is the Python API) and
//! of the safetensors header reader (`qlora_rs.io.checkpoint`).
//!
//! The work runs with the GIL released. The progress callback re-acquires it briefly after each
//! tensor, which is also where a pending Ctrl-C (or an exception raised by the callback) is
//! noticed: the conversion then stops, removes its temporary output, and the exception propagates.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::to_pyerr;
use crate::convert::{self, CompareRow, ConvertOptions, InspectRow, Plan, Progress, Summary};
use crate::gguf::{self, MetaValue};
use crate::{DType, QuantType};

#[allow(clippy::too_many_arguments)]
pub(super) fn options(
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
    dtype: Option<&str>,
    dequantize_only: bool,
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
        dtype: dtype.map(DType::parse).transpose().map_err(to_pyerr)?,
        dequantize_only,
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

/// Calls the Python `add_files(staging_dir)`; an exception is stored (and re-raised by
/// [`take_failure`]) and fails the conversion, which then removes its output.
fn call_add_files(add_files: Option<&Py<PyAny>>, failure: &Mutex<Option<PyErr>>, dir: &std::path::Path) -> crate::Result<()> {
    let Some(cb) = add_files else { return Ok(()) };
    Python::attach(|py| match cb.bind(py).call1((dir.to_string_lossy().into_owned(),)) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            Err(crate::Error::unsupported(msg))
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
        r.set_item("stored", t.stored)?;
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
    let gguf = plan.checkpoint.gguf();
    d.set_item("architecture", gguf.map(|g| g.architecture()))?;
    d.set_item("dropped", gguf.map(|g| g.dropped().to_vec()).unwrap_or_default())?;
    Ok(d)
}

/// Converts a safetensors checkpoint or a GGUF model to bitsandbytes 4-bit (or, for a GGUF with
/// `dequantize_only`, to floats); returns the summary as a dict. `add_files(staging_dir)` is called
/// before a directory output is renamed into place, to add files to it.
#[pyfunction]
#[pyo3(signature = (src, dst, quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, progress=None, dtype=None, dequantize_only=false, add_files=None))]
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
    dtype: Option<&str>,
    dequantize_only: bool,
    add_files: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(
        quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, dtype,
        dequantize_only,
    )?;
    run_conversion(py, &src, dst.as_deref(), &opts, progress, add_files, |_| Ok(()))
}

/// Plans and executes a conversion without the GIL (`adjust` may change the plan first), reporting
/// to `progress` and calling `add_files(staging_dir)` before a directory output is renamed into
/// place; returns the summary as a dict.
pub(super) fn run_conversion<'py>(
    py: Python<'py>,
    src: &std::path::Path,
    dst: Option<&std::path::Path>,
    opts: &ConvertOptions,
    progress: Option<Py<PyAny>>,
    add_files: Option<Py<PyAny>>,
    adjust: impl FnOnce(&mut Plan) -> crate::Result<()> + Send,
) -> PyResult<Bound<'py, PyDict>> {
    let failure = Mutex::new(None);
    let result = py.detach(|| {
        let start = Instant::now();
        let mut plan = convert::plan(src, dst, opts)?;
        adjust(&mut plan)?;
        let mut add = |dir: &std::path::Path| call_add_files(add_files.as_ref(), &failure, dir);
        let add: Option<convert::AddFiles<'_>> = if add_files.is_some() { Some(&mut add) } else { None };
        convert::execute_with(&plan, &mut |p| report(&progress, &failure, p), add, start)
    });
    match result {
        Ok(s) => summary_dict(py, &s),
        Err(e) => Err(take_failure(failure, e)),
    }
}

/// The plan of a conversion (what `--dry-run` prints); reads headers only, writes nothing.
#[pyfunction]
#[pyo3(signature = (src, dst, quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, dtype=None, dequantize_only=false))]
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
    dtype: Option<&str>,
    dequantize_only: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(
        quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force, allow_nonfinite, sync, dtype,
        dequantize_only,
    )?;
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

fn meta_value<'py>(py: Python<'py>, v: &MetaValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        MetaValue::U8(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::I8(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::U16(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::I16(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::U32(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::I32(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::U64(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::I64(x) => x.into_pyobject(py)?.into_any(),
        // Python floats hold the f32 exactly, as float(numpy.float32(x)) does.
        MetaValue::F32(x) => (*x as f64).into_pyobject(py)?.into_any(),
        MetaValue::F64(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::Bool(x) => pyo3::types::PyBool::new(py, *x).to_owned().into_any(),
        MetaValue::String(x) => x.into_pyobject(py)?.into_any(),
        MetaValue::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(meta_value(py, item)?)?;
            }
            list.into_any()
        }
    })
}

/// The header of a GGUF file: version, alignment, metadata (key -> value, in file order) and the
/// tensors (name, torch-order shape, ggml type, transformers name, bytes, file offset). Reads no
/// tensor data.
#[pyfunction]
fn gguf_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let (file, rows) = py
        .detach(|| -> crate::Result<_> {
            let file = gguf::GgufFile::open(&path)?;
            let rows = gguf::inspect(&file);
            Ok((file, rows))
        })
        .map_err(to_pyerr)?;
    let architecture = file.get("general.architecture").and_then(MetaValue::as_str).map(str::to_string);
    let d = PyDict::new(py);
    d.set_item("version", file.version)?;
    d.set_item("alignment", file.alignment)?;
    d.set_item("architecture", architecture)?;
    let metadata = PyDict::new(py);
    for (k, v) in file.metadata() {
        metadata.set_item(k, meta_value(py, v)?)?;
    }
    d.set_item("metadata", metadata)?;
    let tensors = PyList::empty(py);
    for r in &rows {
        let t = PyDict::new(py);
        t.set_item("name", &r.name)?;
        t.set_item("hf_name", r.hf_name.clone())?;
        t.set_item("shape", r.shape.clone())?;
        t.set_item("ggml_type", r.ggml_type)?;
        t.set_item("numel", r.numel)?;
        t.set_item("bytes", r.bytes)?;
        t.set_item("offset", r.offset)?;
        t.set_item("decodable", r.decodable)?;
        tensors.append(t)?;
    }
    d.set_item("tensors", tensors)?;
    Ok(d)
}

/// One tensor of a GGUF model, named as transformers names it, decoded to `dtype` as transformers
/// loads it: (little-endian bytes, shape).
#[pyfunction]
fn gguf_tensor<'py>(py: Python<'py>, path: PathBuf, name: &str, dtype: &str) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>)> {
    let dtype = DType::parse(dtype).map_err(to_pyerr)?;
    let (bytes, shape) = py
        .detach(|| -> crate::Result<_> {
            let source = gguf::GgufSource::open(&path, dtype)?;
            let t = source.get(name).ok_or_else(|| {
                crate::Error::format(&path, format!("no tensor {name:?} (transformers' name) in this GGUF model"))
            })?;
            Ok((source.decode_bytes(t, 0, t.nbytes())?, t.shape.clone()))
        })
        .map_err(to_pyerr)?;
    Ok((PyBytes::new(py, &bytes), shape))
}

/// The validated header of a safetensors file, read by the core's reader (the one every
/// safetensors header in qlora_rs goes through): `data_start` (absolute offset of the data
/// section), `metadata` and `tensors` in data order, each with `name`, `dtype`, `shape` and
/// `begin`/`end` (offsets relative to the data section).
#[pyfunction]
fn safetensors_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let header = py.detach(|| crate::safetensors::read_header(&path)).map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("data_start", header.data_start)?;
    let metadata = PyDict::new(py);
    for (k, v) in &header.metadata {
        metadata.set_item(k, v)?;
    }
    d.set_item("metadata", metadata)?;
    let tensors = PyList::empty(py);
    for t in &header.tensors {
        let e = PyDict::new(py);
        e.set_item("name", &t.name)?;
        e.set_item("dtype", t.dtype.name())?;
        e.set_item("shape", t.shape.clone())?;
        e.set_item("begin", t.begin)?;
        e.set_item("end", t.end)?;
        tensors.append(e)?;
    }
    d.set_item("tensors", tensors)?;
    Ok(d)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gguf_header, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(convert_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(plan_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(compare_checkpoints, m)?)?;
    m.add_function(wrap_pyfunction!(python_float_repr, m)?)?;
    m.add_function(wrap_pyfunction!(default_destination, m)?)?;
    Ok(())
}
