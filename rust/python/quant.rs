//! Bindings of the quantization core (4-bit, 8-bit blockwise, double quant).

use pyo3::prelude::*;

use super::tensor_arg::{no_overlap, Elem, TensorArg};
use super::to_pyerr;
use crate::reduce::{torch_default_threads, SumOrder, TORCH_SUM_WIDTH};
use crate::{blockwise8, codebook, quant4, QuantType};

/// Quantize the float32/float16/bfloat16 tensor `input` to 4 bits: writes (n+1)//2 bytes into
/// `packed` (uint8) and ceil(n/blocksize) float32 into `absmax`.
#[pyfunction]
#[pyo3(signature = (input, quant_type, blocksize, allow_nonfinite, packed, absmax))]
fn quantize_4bit(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    quant_type: &str,
    blocksize: usize,
    allow_nonfinite: bool,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let qt = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let input = TensorArg::new(input, "quantize_4bit: input")?;
    let n = input.len;
    let packed = TensorArg::new(packed, "quantize_4bit: packed")?.expect_of(Elem::U8, quant4::packed_len(n))?;
    let absmax = TensorArg::new(absmax, "quantize_4bit: absmax")?.expect_of(Elem::F32, quant4::num_blocks(n, blocksize))?;
    no_overlap(&[&packed, &absmax], &[&input])?;
    let src = input.float_slice()?;
    // SAFETY: packed and absmax overlap nothing else (checked just above).
    let (p, a) = unsafe { (packed.slice_mut()?, absmax.slice_mut()?) };
    py.detach(|| quant4::quantize_4bit(src, qt, blocksize, allow_nonfinite, p, a)).map_err(to_pyerr)
}

/// Dequantize `out.numel()` elements from `packed` (uint8) and `absmax` (float32) into `out`
/// (float32, float16 or bfloat16).
#[pyfunction]
#[pyo3(signature = (packed, absmax, quant_type, blocksize, out))]
fn dequantize_4bit(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    quant_type: &str,
    blocksize: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let qt = QuantType::parse(quant_type).map_err(to_pyerr)?;
    quant4::check_blocksize(blocksize).map_err(to_pyerr)?;
    let out = TensorArg::new(out, "dequantize_4bit: out")?;
    let n = out.len;
    let packed = TensorArg::new(packed, "dequantize_4bit: packed")?.expect_of(Elem::U8, quant4::packed_len(n))?;
    let absmax = TensorArg::new(absmax, "dequantize_4bit: absmax")?.expect_of(Elem::F32, quant4::num_blocks(n, blocksize))?;
    no_overlap(&[&out], &[&packed, &absmax])?;
    out.advise_huge_pages();
    let (p, a) = (packed.slice()?, absmax.slice()?);
    // SAFETY: out overlaps no other argument (checked above).
    let o = unsafe { out.float_slice_mut()? };
    py.detach(|| quant4::dequantize_4bit(p, a, qt, blocksize, o)).map_err(to_pyerr)
}

fn map256(map: Vec<f32>) -> PyResult<[f32; 256]> {
    let len = map.len();
    map.try_into().map_err(|_| {
        to_pyerr(crate::Error::shape(format!("an 8-bit map needs 256 float32 values, got {len}")))
    })
}

fn check_blocksize8(blocksize: usize) -> PyResult<()> {
    if blocksize == 0 {
        return Err(to_pyerr(crate::Error::unsupported("blocksize must be positive")));
    }
    Ok(())
}

/// Blockwise 8-bit quantization of the float32 tensor `input` with a 256-entry sorted map:
/// one uint8 code per value into `out`, ceil(n/blocksize) float32 into `absmax`.
#[pyfunction]
#[pyo3(signature = (input, map, blocksize, out, absmax))]
fn quantize_blockwise_8bit(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    map: Vec<f32>,
    blocksize: usize,
    out: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let map = map256(map)?;
    check_blocksize8(blocksize)?;
    let input = TensorArg::new(input, "quantize_blockwise_8bit: input")?.expect(Elem::F32)?;
    let n = input.len;
    let out = TensorArg::new(out, "quantize_blockwise_8bit: out")?.expect_of(Elem::U8, n)?;
    let absmax = TensorArg::new(absmax, "quantize_blockwise_8bit: absmax")?.expect_of(Elem::F32, n.div_ceil(blocksize))?;
    no_overlap(&[&out, &absmax], &[&input])?;
    let src = input.slice()?;
    // SAFETY: out and absmax overlap nothing else (checked above).
    let (o, a) = unsafe { (out.slice_mut()?, absmax.slice_mut()?) };
    py.detach(|| blockwise8::quantize_blockwise_8bit(src, &map, blocksize, o, a)).map_err(to_pyerr)
}

/// Inverse of `quantize_blockwise_8bit`: `q` (uint8) and `absmax` (float32) into the float32 `out`.
#[pyfunction]
#[pyo3(signature = (q, absmax, map, blocksize, out))]
fn dequantize_blockwise_8bit(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    map: Vec<f32>,
    blocksize: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let map = map256(map)?;
    check_blocksize8(blocksize)?;
    let q = TensorArg::new(q, "dequantize_blockwise_8bit: q")?.expect(Elem::U8)?;
    let n = q.len;
    let absmax = TensorArg::new(absmax, "dequantize_blockwise_8bit: absmax")?.expect_of(Elem::F32, n.div_ceil(blocksize))?;
    let out = TensorArg::new(out, "dequantize_blockwise_8bit: out")?.expect_of(Elem::F32, n)?;
    no_overlap(&[&out], &[&q, &absmax])?;
    let (qs, a) = (q.slice()?, absmax.slice()?);
    // SAFETY: out overlaps no other argument (checked above).
    let o = unsafe { out.slice_mut()? };
    py.detach(|| blockwise8::dequantize_blockwise_8bit(qs, a, &map, blocksize, o)).map_err(to_pyerr)
}

/// Double-quantize the float32 block scales `absmax`: one uint8 code per block into `q`,
/// ceil(blocks/256) nested absmax float32 into `nested`; returns the offset. `offset` is the mean
/// to subtract (pass torch's `absmax.mean()`: bitsandbytes' offset on every CPU); without it the
/// mean is summed in torch's order with `threads` intra-op threads (default: a fresh torch
/// process's).
#[pyfunction]
#[pyo3(signature = (absmax, q, nested, offset=None, threads=None))]
fn double_quantize(
    py: Python<'_>,
    absmax: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    nested: &Bound<'_, PyAny>,
    offset: Option<f32>,
    threads: Option<usize>,
) -> PyResult<f32> {
    let order = SumOrder::new(TORCH_SUM_WIDTH, threads.unwrap_or_else(torch_default_threads));
    let absmax = TensorArg::new(absmax, "double_quantize: absmax")?.expect(Elem::F32)?;
    let blocks = absmax.len;
    let q = TensorArg::new(q, "double_quantize: q")?.expect_of(Elem::U8, blocks)?;
    let nested = TensorArg::new(nested, "double_quantize: nested")?.expect_of(Elem::F32, blockwise8::nested_blocks(blocks))?;
    no_overlap(&[&q, &nested], &[&absmax])?;
    let a = absmax.slice()?;
    // SAFETY: q and nested overlap nothing else (checked above).
    let (qs, ns) = unsafe { (q.slice_mut()?, nested.slice_mut()?) };
    py.detach(|| match offset {
        Some(offset) => blockwise8::double_quantize_with_offset(a, offset, qs, ns).map(|()| offset),
        None => blockwise8::double_quantize_with(a, order, qs, ns),
    })
    .map_err(to_pyerr)
}

/// Inverse of `double_quantize` with the given nested map: `q` (uint8 per block) and `nested`
/// (float32 per 256 blocks) into the float32 `out`.
#[pyfunction]
#[pyo3(signature = (q, nested, offset, map, out))]
fn double_dequantize(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    nested: &Bound<'_, PyAny>,
    offset: f32,
    map: Vec<f32>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let map = map256(map)?;
    let q = TensorArg::new(q, "double_dequantize: q")?.expect(Elem::U8)?;
    let blocks = q.len;
    let nested = TensorArg::new(nested, "double_dequantize: nested")?.expect_of(Elem::F32, blockwise8::nested_blocks(blocks))?;
    let out = TensorArg::new(out, "double_dequantize: out")?.expect_of(Elem::F32, blocks)?;
    no_overlap(&[&out], &[&q, &nested])?;
    let (qs, ns) = (q.slice()?, nested.slice()?);
    // SAFETY: out overlaps no other argument (checked above).
    let o = unsafe { out.slice_mut()? };
    py.detach(|| blockwise8::double_dequantize(qs, ns, offset, &map, o)).map_err(to_pyerr)
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
