"""qlora-rs: QLoRA with a Rust core — bitsandbytes-compatible NF4/FP4 quantization with double
quantization, 4-bit linear layers with LoRA adapters, paged optimizers, checkpoint conversion.

Only the Rust extension and the exceptions load eagerly; everything else (and with it torch and
transformers) is imported on first use, so `qlora-rs convert` starts in milliseconds.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__version__ = _lib.__version__


def build_info() -> dict:
    """Build facts: ``version``, ``cuda_kernels`` (compiled in?), ``threads`` (rayon threads in use,
    set with ``QLORA_RS_NUM_THREADS``), and the CUDA architectures and nvcc version when built with kernels."""
    return dict(_lib.build_info())


# Public name -> module that defines it.
_LAZY = {
    # quantization
    "quantize": ".functional",
    "dequantize": ".functional",
    "quantize_blockwise_8bit": ".functional",
    "dequantize_blockwise_8bit": ".functional",
    "QuantState": ".quant_state",
    # conversion
    "convert_checkpoint": ".convert",
    "Calibration": ".calibrate",
    # training: 4-bit linear layers, LoRA, model surgery, PEFT-layout adapters
    "Linear4bit": ".nn",
    "LoraLinear4bit": ".nn",
    "LoraLinear": ".nn",
    "linear_4bit": ".autograd",
    "lora_linear_4bit": ".autograd",
    "lora_linear": ".autograd",
    "quantize_model": ".model",
    "add_lora": ".model",
    "prepare_for_training": ".model",
    "merge": ".model",
    "LoraSummary": ".model",
    "MergeError": ".model",
    "save_adapter": ".adapter",
    "load_adapter": ".adapter",
    # loading, the transformers plug-in, training from the command line
    "from_pretrained": ".loading",
    "save_model": ".loading",
    "memory_footprint": ".loading",
    "QloraConfig": ".hf_quantizer",
    "train": ".train",
    "TrainConfig": ".train",
    "merge_checkpoint": ".cli_merge",
    "plan": ".memory_plan",
}
_SUBMODULES = ("optim", "functional", "ops", "nn", "distributed")

__all__ = [
    "QloraError",
    "InvalidArgumentError",
    "NonFiniteError",
    "FormatError",
    "CudaError",
    "CudaUnavailableError",
    "OutOfMemoryError",
    "build_info",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'qlora_rs' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
