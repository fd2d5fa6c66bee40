"""The arguments of the 4-bit torch ops (:mod:`qlora_rs.core.ops`): building them from a
``(packed, QuantState)`` pair and checking them. Every implementation (CPU, CUDA, pure torch)
shares these checks; they are pure (no device call), so the CUDA module uses them without
importing the ops.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _lib
from ..errors import InvalidArgumentError
from .quant_state import QUANT_TYPES, QuantState, dtype_name

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NESTED_BLOCKSIZE = 256


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
