//! Bindings of the CUDA kernel launches (`crate::cuda`). The Python layer (`qlora_rs.cuda_ops`)
//! checks devices, dtypes, shapes and contiguity, allocates the outputs, keeps the tensors alive
//! and passes `data_ptr()` addresses with the raw handle of PyTorch's current stream.
//!
//! Unlike the CPU bindings these take raw addresses (`*_ptr: u64`): they are CUDA device pointers
//! that only kernels enqueued on `stream` read or write, asynchronously, after the call returns;
//! no host code dereferences them, and a DLPack capsule could not describe that lifetime (torch's
//! caching allocator keeps the memory valid for work on the stream).

use pyo3::prelude::*;

use super::to_pyerr;
use crate::cuda::{self, Dequantize4bit, Gemm4bit, GemmKernel, NestedScales, Scales};
use crate::{DType, QuantType};

fn scales(
    absmax_ptr: u64,
    nested_absmax_ptr: Option<u64>,
    nested_code_ptr: Option<u64>,
    offset: f32,
) -> PyResult<Scales> {
    let nested = match (nested_absmax_ptr, nested_code_ptr) {
        (None, None) => None,
        (Some(a), Some(c)) => Some(NestedScales { nested_absmax: a, nested_code: c, offset }),
        _ => {
            return Err(to_pyerr(crate::Error::unsupported(
                "double quantization needs both nested_absmax and nested_code (or neither)",
            )))
        }
    };
    Ok(Scales { absmax: absmax_ptr, nested })
}

/// Dequantize n elements on CUDA device `device`, on stream `stream` (raw CUstream, 0 = default).
#[pyfunction]
#[pyo3(signature = (device, stream, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, n, quant_type, blocksize, out_ptr, out_dtype))]
#[allow(clippy::too_many_arguments)]
fn cuda_dequantize_4bit(
    py: Python<'_>,
    device: i32,
    stream: u64,
    packed_ptr: u64,
    absmax_ptr: u64,
    nested_absmax_ptr: Option<u64>,
    nested_code_ptr: Option<u64>,
    offset: f32,
    n: u64,
    quant_type: &str,
    blocksize: usize,
    out_ptr: u64,
    out_dtype: &str,
) -> PyResult<()> {
    let args = Dequantize4bit {
        packed: packed_ptr,
        scales: scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset)?,
        n,
        quant_type: QuantType::parse(quant_type).map_err(to_pyerr)?,
        blocksize,
        out: out_ptr,
        dtype: DType::parse(out_dtype).map_err(to_pyerr)?,
    };
    py.detach(|| cuda::dequantize_4bit(device, stream, &args)).map_err(to_pyerr)
}

/// Fused out[m, n] = x[m, k] @ dequant(W[n, k])^T on CUDA device `device`, on stream `stream`.
/// `kernel` is "gemv" (tensor cores, m <= 8, `warps` (8, 16 or 32) split K), "mma" (tensor cores,
/// m <= 16, `warps` (1..16, powers of two) split K) or "simt" (m <= 4).
#[pyfunction]
#[pyo3(signature = (device, stream, x_ptr, m, n, k, dtype, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, quant_type, blocksize, out_ptr, kernel="mma", warps=8))]
#[allow(clippy::too_many_arguments)]
fn cuda_gemm_4bit(
    py: Python<'_>,
    device: i32,
    stream: u64,
    x_ptr: u64,
    m: usize,
    n: usize,
    k: usize,
    dtype: &str,
    packed_ptr: u64,
    absmax_ptr: u64,
    nested_absmax_ptr: Option<u64>,
    nested_code_ptr: Option<u64>,
    offset: f32,
    quant_type: &str,
    blocksize: usize,
    out_ptr: u64,
    kernel: &str,
    warps: u32,
) -> PyResult<()> {
    let args = Gemm4bit {
        x: x_ptr,
        m,
        n,
        k,
        dtype: DType::parse(dtype).map_err(to_pyerr)?,
        packed: packed_ptr,
        scales: scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset)?,
        quant_type: QuantType::parse(quant_type).map_err(to_pyerr)?,
        blocksize,
        out: out_ptr,
        kernel: GemmKernel::parse(kernel, warps).map_err(to_pyerr)?,
    };
    py.detach(|| cuda::gemm_4bit(device, stream, &args)).map_err(to_pyerr)
}

/// Raises CudaUnavailableError/CudaError when kernels cannot run on `device` (not compiled, no
/// driver, no such device, module does not load); returns None when they can.
#[pyfunction]
fn cuda_check_device(py: Python<'_>, device: i32) -> PyResult<()> {
    py.detach(|| cuda::check_device(device)).map_err(to_pyerr)
}

/// The code objects in the embedded fatbin ("sm_80", ..., "compute_90"); empty without kernels.
#[pyfunction]
fn cuda_fatbin_targets() -> PyResult<Vec<String>> {
    match cuda::fatbin() {
        Some(bytes) => cuda::fatbin_targets(bytes).map_err(to_pyerr),
        None => Ok(Vec::new()),
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gemm_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_check_device, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_fatbin_targets, m)?)?;
    m.add("CUDA_KERNELS_COMPILED", cuda::KERNELS_COMPILED)?;
    m.add("CUDA_HOW_TO_BUILD", cuda::HOW_TO_BUILD)?;
    m.add("CUDA_FUSED_GEMM_MAX_M", cuda::launch::MMA_MAX_M)?;
    m.add("CUDA_SIMT_GEMM_MAX_M", cuda::launch::SIMT_MAX_M)?;
    m.add("CUDA_GEMV_MAX_M", cuda::launch::GEMV_MAX_M)?;
    Ok(())
}
