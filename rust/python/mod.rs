//! PyO3 bindings: the private module `qlora_rs._lib`. Each function extracts its arguments,
//! releases the GIL around the core call and maps `Error` to the `qlora_rs.errors` tree.
//!
//! CPU tensor data crosses through DLPack (`tensor_arg`): the bindings take the tensors (or their
//! DLPack capsules) and check device, dtype, contiguity, length and aliasing before touching a
//! byte, zero-copy and with bfloat16 (which the buffer protocol lacks) no special case. Raw
//! addresses cross only where they are device memory used on a CUDA stream (`cuda`) or managed
//! memory (`paging`): no CPU code dereferences them.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;

mod calibrate;
mod convert;
mod cuda;
mod decode;
mod gemm;
mod paging;
mod quant;
mod tensor_arg;

/// Raises the `qlora_rs.errors` exception that corresponds to an `Error` variant.
pub(crate) fn to_pyerr(err: Error) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        let class = match &err {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => return pyo3::exceptions::PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => return pyo3::exceptions::PyPermissionError::new_err(msg),
                _ => return pyo3::exceptions::PyOSError::new_err(msg),
            },
            Error::Exists { .. } => return pyo3::exceptions::PyFileExistsError::new_err(msg),
            Error::Unsupported(_) | Error::Shape(_) => "InvalidArgumentError",
            Error::NonFinite { .. } => "NonFiniteError",
            Error::Format { .. } => "FormatError",
            Error::CudaUnavailable(_) => "CudaUnavailableError",
            Error::Cuda { .. } => "CudaError",
            Error::OutOfMemory(_) => "OutOfMemoryError",
        };
        match py.import("qlora_rs.errors").and_then(|m| m.getattr(class)) {
            Ok(cls) => match cls.call1((msg.clone(),)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(e) => e,
            },
            // The package is always importable when _lib is; this only guards odd embeddings.
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
        }
    })
}

/// Build facts: version, whether CUDA kernels are compiled in, thread count; and where the
/// per-layer CPU kernels run their threads in this process (`layer_threads`: "openmp" on the
/// OpenMP team PyTorch loaded, else "rayon"; `layer_team_size`: how many).
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", crate::VERSION)?;
    d.set_item("cuda_kernels", crate::CUDA_KERNELS)?;
    d.set_item("threads", crate::threads::current())?;
    d.set_item("layer_threads", crate::threads::team_backend())?;
    d.set_item("layer_team_size", crate::threads::team_size())?;
    d.set_item("cuda_archs", option_env!("QLORA_RS_CUDA_ARCHS").unwrap_or(""))?;
    d.set_item("nvcc", option_env!("QLORA_RS_NVCC_VERSION").unwrap_or(""))?;
    d.set_item("debug", cfg!(debug_assertions))?;
    Ok(d)
}

#[pymodule]
fn _lib(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::threads::init();
    m.add("__version__", crate::VERSION)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    quant::register(m)?;
    calibrate::register(m)?;
    convert::register(m)?;
    paging::register(m)?;
    cuda::register(m)?;
    gemm::register(m)?;
    decode::register(m)?;
    Ok(())
}
