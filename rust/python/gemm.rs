//! Bindings of the CPU kernels over packed 4-bit weights (`crate::matmul4`, and the decode of
//! `crate::quant4` with double quantization) and of the instruction-set dispatch
//! (`crate::cpu_isa`). The Python layer (`qlora_rs.ops`) checks dtypes, shapes and contiguity,
//! allocates the outputs, keeps the tensors alive for the call and passes `data_ptr()` addresses.

use pyo3::prelude::*;

use super::quant::{advise_huge_pages, float_slice, float_slice_mut, slice};
use super::to_pyerr;
use crate::cpu_isa::Isa;
use crate::matmul4::{self, Weight4};
use crate::quant4::{self, BlockScales};
use crate::{blockwise8, DType, QuantType};

/// The block scales at `absmax_ptr`: float32, or with both nested pointers uint8 codes decoded
/// as `nested_code[q] * nested_absmax[b / 256] + offset`.
///
/// SAFETY: the pointers address `blocks` scales (codes), ceil(blocks / 256) nested absmax and
/// 256 nested code values, as [`slice`].
unsafe fn block_scales<'a>(
    absmax_ptr: usize,
    nested_absmax_ptr: Option<usize>,
    nested_code_ptr: Option<usize>,
    offset: f32,
    blocks: usize,
) -> PyResult<BlockScales<'a>> {
    match (nested_absmax_ptr, nested_code_ptr) {
        (None, None) => Ok(BlockScales::F32(slice(absmax_ptr, blocks))),
        (Some(nested), Some(code)) => Ok(BlockScales::Double {
            codes: slice(absmax_ptr, blocks),
            nested_absmax: slice(nested, blockwise8::nested_blocks(blocks)),
            nested_map: &*(code as *const [f32; 256]),
            offset,
        }),
        _ => Err(to_pyerr(crate::Error::unsupported(
            "double quantization needs both nested_absmax and nested_code (or neither)",
        ))),
    }
}

fn isa_or_current(isa: Option<&str>) -> PyResult<Isa> {
    match isa {
        Some(name) => Isa::parse(name),
        None => Isa::current(),
    }
    .map_err(to_pyerr)
}

/// Fused out[m, n] = x[m, k] @ dequant(W[n, k])^T on the CPU, never decoding W to memory; x and
/// out of `dtype`. `isa`: a level from `cpu_isas()` (default: `cpu_isa()`).
#[pyfunction]
#[pyo3(signature = (x_ptr, m, n, k, dtype, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, quant_type, blocksize, out_ptr, isa=None))]
#[allow(clippy::too_many_arguments)]
fn cpu_gemm_4bit(
    py: Python<'_>,
    x_ptr: usize,
    m: usize,
    n: usize,
    k: usize,
    dtype: &str,
    packed_ptr: usize,
    absmax_ptr: usize,
    nested_absmax_ptr: Option<usize>,
    nested_code_ptr: Option<usize>,
    offset: f32,
    quant_type: &str,
    blocksize: usize,
    out_ptr: usize,
    isa: Option<&str>,
) -> PyResult<()> {
    let dtype = DType::parse(dtype).map_err(to_pyerr)?;
    let quant_type = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let isa = isa_or_current(isa)?;
    let elements = n.checked_mul(k).ok_or_else(|| to_pyerr(crate::Error::shape("weight shape overflows")))?;
    // SAFETY: the Python layer passes live tensors of these sizes (module docs).
    unsafe {
        let weight = Weight4 {
            packed: slice(packed_ptr, quant4::packed_len(elements)),
            scales: block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, quant4::num_blocks(elements, blocksize))?,
            quant_type,
            blocksize,
            rows: n,
            cols: k,
        };
        let x = float_slice(x_ptr, m * k, dtype);
        let out = float_slice_mut(out_ptr, m * n, dtype);
        py.detach(|| matmul4::gemm_4bit(x, m, &weight, out, isa))
    }
    .map_err(to_pyerr)
}

/// Dequantize n elements into `out_ptr` of `out_dtype` on the CPU, decoding double-quantized
/// scales block by block (no float32 copy). `isa`: a level from `cpu_isas()` (default:
/// `cpu_isa()`).
#[pyfunction]
#[pyo3(signature = (packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, n, quant_type, blocksize, out_ptr, out_dtype, isa=None))]
#[allow(clippy::too_many_arguments)]
fn cpu_dequantize_4bit(
    py: Python<'_>,
    packed_ptr: usize,
    absmax_ptr: usize,
    nested_absmax_ptr: Option<usize>,
    nested_code_ptr: Option<usize>,
    offset: f32,
    n: usize,
    quant_type: &str,
    blocksize: usize,
    out_ptr: usize,
    out_dtype: &str,
    isa: Option<&str>,
) -> PyResult<()> {
    let dtype = DType::parse(out_dtype).map_err(to_pyerr)?;
    let quant_type = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let isa = isa_or_current(isa)?;
    advise_huge_pages(out_ptr, n * dtype.size());
    // SAFETY: the Python layer passes live tensors of these sizes (module docs).
    unsafe {
        let scales = block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, quant4::num_blocks(n, blocksize))?;
        let packed = slice(packed_ptr, quant4::packed_len(n));
        let out = float_slice_mut(out_ptr, n, dtype);
        py.detach(|| quant4::dequantize_4bit_with(packed, scales, quant_type, blocksize, out, isa))
    }
    .map_err(to_pyerr)
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_gemm_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isas, m)?)?;
    Ok(())
}
