//! Bindings of the quantization core (4-bit, 8-bit blockwise, double quant).

use pyo3::prelude::*;

use super::to_pyerr;
use crate::reduce::{torch_default_threads, SumOrder, TORCH_SUM_WIDTH};
use crate::{blockwise8, codebook, quant4, DType, FloatSlice, FloatSliceMut, QuantType};

/// A slice over memory owned by a torch tensor the caller keeps alive for the call.
///
/// SAFETY: `ptr` must point to `len` valid, aligned elements (or be anything when `len == 0`)
/// that nothing else writes during the call; the Python layer (`qlora_rs.functional`,
/// `qlora_rs.ops`, `qlora_rs.calibrate`) ensures it.
pub(super) unsafe fn slice<'a, T>(ptr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr as *const T, len)
    }
}

/// SAFETY: as [`slice`], and no other reference to the memory exists during the call.
pub(super) unsafe fn slice_mut<'a, T>(ptr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(ptr as *mut T, len)
    }
}

/// Asks Linux to back a freshly allocated output with transparent huge pages: a 32 MiB tensor then
/// takes 16 page faults instead of 8192, which otherwise cost more than decoding into it.
/// Advice only: it changes no data and failures are ignored.
pub(super) fn advise_huge_pages(ptr: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = ptr.next_multiple_of(HUGE);
        let end = (ptr + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: madvise only advises the kernel about pages the caller's tensor owns.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// [`slice`] as the dtype's float slice (SAFETY as there).
pub(super) unsafe fn float_slice<'a>(ptr: usize, len: usize, dtype: DType) -> FloatSlice<'a> {
    match dtype {
        DType::F32 => FloatSlice::F32(slice(ptr, len)),
        DType::F16 => FloatSlice::F16(slice(ptr, len)),
        DType::BF16 => FloatSlice::BF16(slice(ptr, len)),
    }
}

/// [`slice_mut`] as the dtype's float slice (SAFETY as there).
pub(super) unsafe fn float_slice_mut<'a>(ptr: usize, len: usize, dtype: DType) -> FloatSliceMut<'a> {
    match dtype {
        DType::F32 => FloatSliceMut::F32(slice_mut(ptr, len)),
        DType::F16 => FloatSliceMut::F16(slice_mut(ptr, len)),
        DType::BF16 => FloatSliceMut::BF16(slice_mut(ptr, len)),
    }
}

/// Quantize n elements at `input_ptr` (dtype name) to 4 bits: writes (n+1)//2 bytes at
/// `packed_ptr` and ceil(n/blocksize) float32 at `absmax_ptr`.
#[pyfunction]
#[pyo3(signature = (input_ptr, n, dtype, quant_type, blocksize, allow_nonfinite, packed_ptr, absmax_ptr))]
#[allow(clippy::too_many_arguments)]
fn quantize_4bit(
    py: Python<'_>,
    input_ptr: usize,
    n: usize,
    dtype: &str,
    quant_type: &str,
    blocksize: usize,
    allow_nonfinite: bool,
    packed_ptr: usize,
    absmax_ptr: usize,
) -> PyResult<()> {
    let dtype = DType::parse(dtype).map_err(to_pyerr)?;
    let qt = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let blocks = quant4::num_blocks(n, blocksize);
    py.detach(|| unsafe {
        quant4::quantize_4bit(
            float_slice(input_ptr, n, dtype),
            qt,
            blocksize,
            allow_nonfinite,
            slice_mut(packed_ptr, quant4::packed_len(n)),
            slice_mut(absmax_ptr, blocks),
        )
    })
    .map_err(to_pyerr)
}

/// Dequantize n elements from `packed_ptr`/`absmax_ptr` (float32) into `out_ptr` of `out_dtype`.
#[pyfunction]
#[pyo3(signature = (packed_ptr, absmax_ptr, n, quant_type, blocksize, out_ptr, out_dtype))]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit(
    py: Python<'_>,
    packed_ptr: usize,
    absmax_ptr: usize,
    n: usize,
    quant_type: &str,
    blocksize: usize,
    out_ptr: usize,
    out_dtype: &str,
) -> PyResult<()> {
    let dtype = DType::parse(out_dtype).map_err(to_pyerr)?;
    let qt = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let blocks = quant4::num_blocks(n, blocksize);
    advise_huge_pages(out_ptr, n * dtype.size());
    py.detach(|| unsafe {
        quant4::dequantize_4bit(
            slice(packed_ptr, quant4::packed_len(n)),
            slice(absmax_ptr, blocks),
            qt,
            blocksize,
            float_slice_mut(out_ptr, n, dtype),
        )
    })
    .map_err(to_pyerr)
}

fn map256(map: Vec<f32>) -> PyResult<[f32; 256]> {
    let len = map.len();
    map.try_into().map_err(|_| {
        to_pyerr(crate::Error::shape(format!("an 8-bit map needs 256 float32 values, got {len}")))
    })
}

/// Blockwise 8-bit quantization of n float32 values with a 256-entry sorted map.
#[pyfunction]
#[pyo3(signature = (input_ptr, n, map, blocksize, out_ptr, absmax_ptr))]
fn quantize_blockwise_8bit(
    py: Python<'_>,
    input_ptr: usize,
    n: usize,
    map: Vec<f32>,
    blocksize: usize,
    out_ptr: usize,
    absmax_ptr: usize,
) -> PyResult<()> {
    let map = map256(map)?;
    if blocksize == 0 {
        return Err(to_pyerr(crate::Error::unsupported("blocksize must be positive")));
    }
    py.detach(|| unsafe {
        blockwise8::quantize_blockwise_8bit(
            slice(input_ptr, n),
            &map,
            blocksize,
            slice_mut(out_ptr, n),
            slice_mut(absmax_ptr, n.div_ceil(blocksize)),
        )
    })
    .map_err(to_pyerr)
}

/// Inverse of `quantize_blockwise_8bit`, into n float32 values at `out_ptr`.
#[pyfunction]
#[pyo3(signature = (q_ptr, absmax_ptr, n, map, blocksize, out_ptr))]
fn dequantize_blockwise_8bit(
    py: Python<'_>,
    q_ptr: usize,
    absmax_ptr: usize,
    n: usize,
    map: Vec<f32>,
    blocksize: usize,
    out_ptr: usize,
) -> PyResult<()> {
    let map = map256(map)?;
    if blocksize == 0 {
        return Err(to_pyerr(crate::Error::unsupported("blocksize must be positive")));
    }
    py.detach(|| unsafe {
        blockwise8::dequantize_blockwise_8bit(
            slice(q_ptr, n),
            slice(absmax_ptr, n.div_ceil(blocksize)),
            &map,
            blocksize,
            slice_mut(out_ptr, n),
        )
    })
    .map_err(to_pyerr)
}

/// Double-quantize `blocks` float32 absmax values: writes `blocks` bytes and ceil(blocks/256)
/// nested absmax floats; returns the offset. `offset` is the mean to subtract (pass torch's
/// `absmax.mean()`: bitsandbytes' offset on every CPU); without it the mean is summed in torch's
/// order with `threads` intra-op threads (default: a fresh torch process's).
#[pyfunction]
#[pyo3(signature = (absmax_ptr, blocks, q_ptr, nested_ptr, offset=None, threads=None))]
fn double_quantize(
    py: Python<'_>,
    absmax_ptr: usize,
    blocks: usize,
    q_ptr: usize,
    nested_ptr: usize,
    offset: Option<f32>,
    threads: Option<usize>,
) -> PyResult<f32> {
    let order = SumOrder::new(TORCH_SUM_WIDTH, threads.unwrap_or_else(torch_default_threads));
    py.detach(|| unsafe {
        let absmax = slice(absmax_ptr, blocks);
        let (q, nested) = (slice_mut(q_ptr, blocks), slice_mut(nested_ptr, blockwise8::nested_blocks(blocks)));
        match offset {
            Some(offset) => blockwise8::double_quantize_with_offset(absmax, offset, q, nested).map(|()| offset),
            None => blockwise8::double_quantize_with(absmax, order, q, nested),
        }
    })
    .map_err(to_pyerr)
}

/// Inverse of `double_quantize` with the given nested map, into `blocks` float32 at `out_ptr`.
#[pyfunction]
#[pyo3(signature = (q_ptr, nested_ptr, blocks, offset, map, out_ptr))]
fn double_dequantize(
    py: Python<'_>,
    q_ptr: usize,
    nested_ptr: usize,
    blocks: usize,
    offset: f32,
    map: Vec<f32>,
    out_ptr: usize,
) -> PyResult<()> {
    let map = map256(map)?;
    py.detach(|| unsafe {
        blockwise8::double_dequantize(
            slice(q_ptr, blocks),
            slice(nested_ptr, blockwise8::nested_blocks(blocks)),
            offset,
            &map,
            slice_mut(out_ptr, blocks),
        )
    })
    .map_err(to_pyerr)
}

/// The 16 decode values of a 4-bit type ("nf4", "fp4", "int4"), index = nibble.
#[pyfunction]
fn code_table(quant_type: &str) -> PyResult<Vec<f32>> {
    Ok(QuantType::parse(quant_type).map_err(to_pyerr)?.code().to_vec())
}

/// The 8-bit dynamic map: signed (as stored for double quant) or unsigned.
#[pyfunction]
fn dynamic_map(signed: bool) -> Vec<f32> {
    if signed {
        blockwise8::signed_dynamic_map().to_vec()
    } else {
        codebook::dynamic_map(false).to_vec()
    }
}

/// Validates a block size, raising the error that lists the supported ones.
#[pyfunction]
fn check_blocksize(blocksize: usize) -> PyResult<()> {
    quant4::check_blocksize(blocksize).map_err(to_pyerr)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(double_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(code_table, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(check_blocksize, m)?)?;
    m.add("BLOCKSIZES", quant4::BLOCKSIZES.to_vec())?;
    m.add("NESTED_BLOCKSIZE", blockwise8::NESTED_BLOCKSIZE)?;
    Ok(())
}
