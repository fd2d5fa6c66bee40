"""The torch operators of qlora_rs: ``torch.ops.qlora_rs.dequantize_4bit`` and
``torch.ops.qlora_rs.gemm_4bit``.

Each has a schema, a fake (meta) implementation, so that ``torch.compile`` and meta-device models
see through it, and per-device kernels behind it:

- CPU: the Rust core decodes (GIL released, rayon); the matmul is torch's (MKL/oneDNN).
- CUDA: kernels registered for the ``CUDA`` dispatch key by ``qlora_rs.cuda_ops`` when compiled in.
  Without them every other device (CUDA included) runs a pure-torch decode registered as the
  ``CompositeExplicitAutograd`` default; it is exact but slow and says so once in the log.

Arguments common to both ops describe one packed 4-bit tensor exactly as :class:`QuantState`
holds it: ``packed`` (uint8, or any dtype viewed as its bytes: the float "quant storage" that
FSDP shards), ``absmax`` (float32 per block, or uint8 with double quantization, then decoded as
``nested_code[absmax] * nested_absmax + offset``), ``quant_type``, ``blocksize`` and the
original ``shape``. :func:`quant_args` builds them from a ``(packed, QuantState)`` pair.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _lib
from .errors import InvalidArgumentError
from .quant_state import QUANT_TYPES, QuantState, code_table, dtype_name

_log = logging.getLogger("qlora_rs")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NESTED_BLOCKSIZE = 256

torch.library.define(
    "qlora_rs::dequantize_4bit",
    "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, str quant_type, "
    "int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor",
)
torch.library.define(
    "qlora_rs::gemm_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
    "str quant_type, int blocksize, SymInt[] shape) -> Tensor",
)


def quant_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """The op arguments after ``x`` for a packed tensor and its state:
    ``(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)``."""
    return (
        packed,
        state.absmax,
        state.nested_absmax if state.nested else None,
        state.nested_code if state.nested else None,
        float(state.offset) if state.nested else 0.0,
        state.quant_type,
        int(state.blocksize),
        [int(s) for s in state.shape],
    )


def _cpu_has_fast_matmul(dtype: torch.dtype) -> bool:
    # These probes are private torch API; a torch without them gets the always-correct float32 path.
    probe = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }.get(dtype, ())
    for name in probe:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


# bf16/fp16 GEMMs on CPUs without native support (AVX2, plain AVX-512) run an order of magnitude
# slower than float32; the float32 product of the same bf16 values, rounded once at the end, is
# what a native kernel (fp32 accumulation) computes anyway.
_CPU_NATIVE = {dt: _cpu_has_fast_matmul(dt) for dt in (torch.bfloat16, torch.float16)}


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which a product with inputs in ``dtype`` is computed on ``device``: ``dtype``
    itself, except float32 for bf16/fp16 on CPUs without native half-precision matrix units."""
    if device.type == "cpu" and dtype in _CPU_NATIVE and not _CPU_NATIVE[dtype]:
        return torch.float32
    return dtype


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------
# Argument checks, shared by every implementation (CPU, CUDA, pure torch). Pure: no device call.


def check_quant_args(
    where: str,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
) -> int:
    """Checks the description of one packed 4-bit tensor (the ops' arguments after ``x``);
    returns its element count. Errors start with ``where`` and name the bad argument."""
    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"{where}: unsupported quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    _lib.check_blocksize(int(blocksize))
    if any(int(s) < 0 for s in shape):
        raise InvalidArgumentError(f"{where}: shape {list(shape)} has a negative size")
    n = _numel(shape)
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise InvalidArgumentError(
            f"{where}: packed weight has {nbytes} bytes ({dtype_name(packed.dtype)} {list(packed.shape)}) but shape "
            f"{list(shape)} needs {(n + 1) // 2}"
        )
    blocks = -(-n // int(blocksize))
    nested = nested_absmax is not None
    if (nested_code is not None) != nested:
        raise InvalidArgumentError(f"{where}: nested_absmax and nested_code must be given together (double quantization)")
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want or absmax.numel() != blocks:
        raise InvalidArgumentError(
            f"{where}: absmax is {dtype_name(absmax.dtype)} with {absmax.numel()} entries; shape {list(shape)} in blocks "
            f"of {blocksize} {'with' if nested else 'without'} double quantization needs {dtype_name(want)} with {blocks}"
        )
    if nested:
        nb = -(-blocks // _NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nb:
            raise InvalidArgumentError(
                f"{where}: nested_absmax is {dtype_name(nested_absmax.dtype)} with {nested_absmax.numel()} entries; "
                f"{blocks} blocks need float32 with {nb}"
            )
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise InvalidArgumentError(
                f"{where}: nested_code is {dtype_name(nested_code.dtype)} with {nested_code.numel()} entries; "
                "expected float32 with 256"
            )
        if not math.isfinite(float(offset)):
            raise InvalidArgumentError(f"{where}: offset must be finite, got {offset}")
    return n


def check_out_dtype(where: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(f"{where}: dtype {dtype_name(dtype)} is not supported: expected float32, float16 or bfloat16")


def check_gemm_input(where: str, x: torch.Tensor, shape: Sequence[int]) -> None:
    """Checks ``x`` against a weight of ``shape`` [out, in] for ``x @ W^T``."""
    if len(shape) != 2:
        raise InvalidArgumentError(f"{where}: weight shape must be [out, in], got {list(shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(f"{where}: x is {dtype_name(x.dtype)}: expected float32, float16 or bfloat16")
    if x.dim() == 0 or x.shape[-1] != shape[1]:
        raise InvalidArgumentError(
            f"{where}: x has shape {list(x.shape)}; the weight [out={shape[0]}, in={shape[1]}] needs its last "
            f"dimension to be {shape[1]}"
        )


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as flat contiguous uint8: any storage dtype (bitsandbytes' quant_storage,
    FSDP's float view) is read as its bytes."""
    flat = packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


_DEQUANTIZE = "qlora_rs::dequantize_4bit"
_GEMM = "qlora_rs::gemm_4bit"


# ---------------------------------------------------------------------------------------------
# CPU: the Rust core.


def _block_scales_cpu(absmax, nested_absmax, nested_code, offset: float) -> torch.Tensor:
    if nested_absmax is None:
        return absmax.contiguous()
    q = absmax.contiguous()
    nested = nested_absmax.contiguous()
    out = torch.empty(q.numel(), dtype=torch.float32)
    _lib.double_dequantize(
        q.data_ptr(), nested.data_ptr(), q.numel(), float(offset), nested_code.tolist(), out.data_ptr()
    )
    return out


def _dequantize_cpu(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    check_quant_args(_DEQUANTIZE, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
    check_out_dtype(_DEQUANTIZE, dtype)
    data = packed_bytes(packed)
    scales = _block_scales_cpu(absmax, nested_absmax, nested_code, offset)
    out = torch.empty([int(s) for s in shape], dtype=dtype)
    _lib.dequantize_4bit(
        data.data_ptr(), scales.data_ptr(), out.numel(), quant_type, int(blocksize), out.data_ptr(), dtype_name(dtype)
    )
    return out


def _gemm_cpu(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    check_gemm_input(_GEMM, x, shape)
    mm = matmul_dtype(x.dtype, x.device)
    w = _dequantize_cpu(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, mm)
    return F.linear(x.to(mm), w).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Any other device until a kernel is registered for it: decode with torch ops (exact, slow).

_slow_path_logged: set = set()
_code_cache: dict = {}


def _log_slow_path(device: torch.device) -> None:
    if device.type not in _slow_path_logged:
        _slow_path_logged.add(device.type)
        _log.warning(
            "qlora_rs: no %s kernel is registered for the 4-bit ops (qlora_rs.build_info()['cuda_kernels'] is False "
            "or the device is not CUDA); using the pure-torch decode, which is correct but slow",
            device.type,
        )


def _code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, str(device))
    if key not in _code_cache:
        _code_cache[key] = code_table(quant_type).to(device)
    return _code_cache[key]


def _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    """The decode in torch ops, bit-exact with the Rust core: the scale is ``nested_code[q] *
    nested_absmax + offset`` (two float32 roundings, kept apart as separate ops so nothing fuses
    them into an fma) and each value ``code[nibble] * scale`` in float32, rounded once to ``dtype``."""
    check_quant_args(_DEQUANTIZE, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
    check_out_dtype(_DEQUANTIZE, dtype)
    device = packed.device
    n = _numel(shape)
    blocks = absmax.numel()
    if nested_absmax is None:
        scales = absmax
    else:
        nested = nested_absmax.repeat_interleave(_NESTED_BLOCKSIZE)[:blocks]
        scales = nested_code[absmax.long()] * nested
        scales = scales + torch.tensor(offset, dtype=torch.float32, device=device)
    data = packed_bytes(packed)
    nibbles = torch.stack((data >> 4, data & 0x0F), dim=-1).reshape(-1)[:n]
    values = _code_on(quant_type, device)[nibbles.long()]
    values = values * scales.repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape([int(s) for s in shape])


def _dequantize_fallback(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    _log_slow_path(packed.device)
    return _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype)


def _gemm_fallback(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    _log_slow_path(x.device)
    check_gemm_input(_GEMM, x, shape)
    w = _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, x.dtype)
    return F.linear(x, w)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only.


def _dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    torch._check(
        packed.numel() * packed.element_size() == (math.prod(shape) + 1) // 2,
        lambda: f"qlora_rs::dequantize_4bit: packed weight size does not match shape {list(shape)}",
    )
    return packed.new_empty(shape, dtype=dtype)


def _gemm_fake(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    torch._check(len(shape) == 2, lambda: f"qlora_rs::gemm_4bit: weight shape must be [out, in], got {list(shape)}")
    torch._check(
        x.shape[-1] == shape[1],
        lambda: f"qlora_rs::gemm_4bit: x has shape {list(x.shape)}; the weight needs its last dimension {shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], shape[0]))


torch.library.impl("qlora_rs::dequantize_4bit", "CPU", _dequantize_cpu)
torch.library.impl("qlora_rs::gemm_4bit", "CPU", _gemm_cpu)
torch.library.impl("qlora_rs::dequantize_4bit", "CompositeExplicitAutograd", _dequantize_fallback)
torch.library.impl("qlora_rs::gemm_4bit", "CompositeExplicitAutograd", _gemm_fallback)
torch.library.register_fake("qlora_rs::dequantize_4bit", _dequantize_fake)
torch.library.register_fake("qlora_rs::gemm_4bit", _gemm_fake)


# ---------------------------------------------------------------------------------------------
# Autograd of gemm_4bit: the gradient wrt x only (the 4-bit weight is frozen); the backward saves
# nothing but the packed weight and its scales, and dequantizes once.


def grad_input_4bit(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """``grad @ dequant(W)`` in ``grad.dtype``: the input gradient of ``x @ W^T``."""
    mm = matmul_dtype(grad.dtype, grad.device)
    w = torch.ops.qlora_rs.dequantize_4bit(
        packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, mm
    )
    return torch.matmul(grad.to(mm), w).to(grad.dtype)


def _gemm_setup_context(ctx, inputs, output) -> None:
    _, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
    ctx.meta = (offset, quant_type, blocksize, shape)


def _gemm_backward(ctx, grad):
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input_4bit(grad, *ctx.saved_tensors, *ctx.meta)
    return grad_x, None, None, None, None, None, None, None, None


torch.library.register_autograd("qlora_rs::gemm_4bit", _gemm_backward, setup_context=_gemm_setup_context)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.ops.qlora_rs.dequantize_4bit`` on a ``(packed, QuantState)`` pair, on the tensors'
    device (default dtype: the state's)."""
    return torch.ops.qlora_rs.dequantize_4bit(*quant_args(packed, state), dtype or state.dtype)


def gemm_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ dequant(W)^T`` in ``x.dtype`` through ``torch.ops.qlora_rs.gemm_4bit`` (differentiable wrt x)."""
    return torch.ops.qlora_rs.gemm_4bit(x, *quant_args(packed, state))


# CUDA kernels for both ops, registered when the library was built with them (see cuda_ops).
from . import cuda_ops  # noqa: E402,F401
