"""qlora-rs: QLoRA with a Rust core — bitsandbytes-compatible NF4/FP4 quantization with double
quantization, 4-bit linear layers with LoRA adapters, paged optimizers, checkpoint conversion."""

from __future__ import annotations

from . import _lib
from .errors import (
    CudaError,
    CudaUnavailableError,
    FormatError,
    InvalidArgumentError,
    NonFiniteError,
    OutOfMemoryError,
    QloraError,
)
from .functional import dequantize, dequantize_blockwise_8bit, quantize, quantize_blockwise_8bit
from .quant_state import QuantState

__version__ = _lib.__version__


def build_info() -> dict:
    """Build facts: ``version``, ``cuda_kernels`` (compiled in?), ``threads`` (rayon threads in use,
    set with ``QLORA_RS_NUM_THREADS``), and the CUDA architectures and nvcc version when built with kernels."""
    return dict(_lib.build_info())


__all__ = [
    "QloraError",
    "InvalidArgumentError",
    "NonFiniteError",
    "FormatError",
    "CudaError",
    "CudaUnavailableError",
    "OutOfMemoryError",
    "QuantState",
    "quantize",
    "dequantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "build_info",
]
