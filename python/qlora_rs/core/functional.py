"""Quantize and dequantize tensors with the Rust core (CPU, GIL released, no Python loops).

Tensors cross into Rust by pointer: this module checks dtype, device and contiguity, allocates
the outputs with torch and keeps every tensor alive for the duration of the call.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from .. import _lib
from ..errors import InvalidArgumentError
from .quant_state import QUANT_TYPES, QuantState, code_table, dtype_name, nested_code_table, parse_dtype

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Array = Union[torch.Tensor, np.ndarray]


def _as_cpu_tensor(t: Array, what: str) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        if t.dtype not in (np.float32, np.float16):
            raise InvalidArgumentError(
                f"{what}: numpy dtype {t.dtype} is not supported: expected float32 or float16 "
                "(bfloat16 data: pass a torch tensor, or an int16/uint16 array viewed with torch's .view(torch.bfloat16))"
            )
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(
            f"{what}: dtype {dtype_name(t.dtype)} is not supported: expected one of float32, float16, bfloat16"
        )
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def _check_quant_args(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"unsupported quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    _lib.check_blocksize(int(blocksize))


def quantize(
    t: Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes a float32/float16/bfloat16 tensor (or numpy array) to packed 4-bit.

    Returns ``(packed, state)``: ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``, high nibble
    first, exactly as bitsandbytes' ``quantize_4bit`` stores it; ``state`` holds the block scales
    (double-quantized when ``double_quant``) and everything else needed to decode.

    NaN/inf raise :class:`NonFiniteError` naming the first bad position unless ``allow_nonfinite``.
    CUDA tensors are quantized on the CPU and the results moved back to their device.
    """
    _check_quant_args(quant_type, blocksize)
    device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
    src = _as_cpu_tensor(t, "quantize")
    n = src.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    _lib.quantize_4bit(src.detach(), quant_type, blocksize, allow_nonfinite, packed, absmax)
    state = QuantState(
        absmax=absmax, shape=src.shape, dtype=src.dtype, blocksize=blocksize,
        quant_type=quant_type, code=code_table(quant_type),
    )
    if double_quant:
        _double_quantize_into(state)
    if device.type != "cpu":
        packed, state = packed.to(device), state.to(device)
    return packed, state


def _double_quantize_into(state: QuantState) -> None:
    absmax = state.absmax
    blocks = absmax.numel()
    q = torch.empty(blocks, dtype=torch.uint8)
    nested = torch.empty(-(-blocks // 256), dtype=torch.float32)
    # bitsandbytes subtracts torch's float32 mean; taking it from torch makes the offset, and so
    # every nested code, identical on every CPU and torch version.
    offset = float(absmax.mean()) if blocks else 0.0
    _lib.double_quantize(absmax, q, nested, offset)
    state.absmax, state.offset = q, offset
    state.nested_absmax, state.nested_code = nested, nested_code_table()


def absmax_float(state: QuantState) -> torch.Tensor:
    """The float32 block scales of a state (decoding the double quantization if any), on the CPU."""
    if not state.nested:
        return state.absmax.to("cpu", torch.float32).contiguous()
    q = state.absmax.to("cpu").contiguous()
    nested = state.nested_absmax.to("cpu", torch.float32).contiguous()
    out = torch.empty(q.numel(), dtype=torch.float32)
    _lib.double_dequantize(q, nested, float(state.offset), state.nested_code.to("cpu", torch.float32).tolist(), out)
    return out


def dequantize(packed: torch.Tensor, state: QuantState, dtype: Optional[Any] = None) -> torch.Tensor:
    """Decodes ``packed`` back to a tensor of ``state.shape`` in ``dtype`` (default: the original
    dtype). Each value is ``code[nibble] * absmax`` in float32, rounded once to ``dtype``."""
    out_dtype = parse_dtype(dtype) if dtype is not None else state.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"dequantize: dtype {out_dtype} is not supported: expected float32, float16 or bfloat16")
    if not isinstance(packed, torch.Tensor):
        raise InvalidArgumentError(f"dequantize: packed must be a torch.Tensor, got {type(packed).__name__}")
    device = packed.device
    data = packed.to("cpu").contiguous()
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)  # a float "storage" view of the packed bytes
    n = state.numel
    if data.numel() != (n + 1) // 2:
        raise InvalidArgumentError(
            f"dequantize: packed has {data.numel()} bytes but shape {list(state.shape)} needs {(n + 1) // 2}"
        )
    state.validate()
    absmax = absmax_float(state)
    out = torch.empty(state.shape, dtype=out_dtype)
    _lib.dequantize_4bit(data, absmax, state.quant_type, state.blocksize, out)
    return out if device.type == "cpu" else out.to(device)


def quantize_blockwise_8bit(
    t: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 tensor with a sorted 256-value map (default: the
    signed dynamic map). Returns ``(codes uint8 same shape, absmax float32 [blocks])``."""
    src = _as_cpu_tensor(t, "quantize_blockwise_8bit").float().contiguous()
    code = nested_code_table() if code is None else code
    if code.numel() != 256:
        raise InvalidArgumentError(f"quantize_blockwise_8bit: code must have 256 values, got {code.numel()}")
    n = src.numel()
    out = torch.empty(src.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _lib.quantize_blockwise_8bit(src.detach(), code.float().tolist(), blocksize, out, absmax)
    return out, absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit` (float32 result)."""
    code = nested_code_table() if code is None else code
    qc = q.to("cpu").contiguous()
    am = absmax.to("cpu", torch.float32).contiguous()
    if qc.dtype != torch.uint8:
        raise InvalidArgumentError(f"dequantize_blockwise_8bit: codes must be uint8, got {dtype_name(qc.dtype)}")
    n = qc.numel()
    if am.numel() != -(-n // blocksize):
        raise InvalidArgumentError(
            f"dequantize_blockwise_8bit: absmax has {am.numel()} entries; {n} codes in blocks of {blocksize} need {-(-n // blocksize)}"
        )
    out = torch.empty(qc.shape, dtype=torch.float32)
    _lib.dequantize_blockwise_8bit(qc.detach(), am.detach(), code.float().tolist(), blocksize, out)
    return out
