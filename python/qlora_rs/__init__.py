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
    "quantize": ".core.functional",
    "dequantize": ".core.functional",
    "quantize_blockwise_8bit": ".core.functional",
    "dequantize_blockwise_8bit": ".core.functional",
    "QuantState": ".core.quant_state",
    # conversion
    "convert_checkpoint": ".io.convert",
    "Calibration": ".io.calibrate",
    # training: 4-bit linear layers, LoRA, model surgery, PEFT-layout adapters
    "Linear4bit": ".nn",
    "LoraLinear4bit": ".nn",
    "LoraLinear": ".nn",
    "linear_4bit": ".core.autograd",
    "lora_linear_4bit": ".core.autograd",
    "lora_linear": ".core.autograd",
    "quantize_model": ".surgery.model",
    "add_lora": ".surgery.model",
    "prepare_for_training": ".surgery.model",
    "merge": ".surgery.model",
    "LoraSummary": ".surgery.model",
    "MergeError": ".nn.merge",
    "save_adapter": ".api.adapters",
    "load_adapter": ".surgery.adapter",
    # loading, the transformers plug-in, training from the command line
    "from_pretrained": ".api.loading",
    "save_model": ".io.loading",
    "memory_footprint": ".io.loading",
    "QloraConfig": ".io.hf_quantizer",
    "train": ".training.train",
    "TrainConfig": ".training.train",
    "merge_checkpoint": ".cli.merge",
    "plan": ".training.memory_plan",
}
# Public submodules reachable as attributes (``qlora_rs.ops.cpu_isa()``), by where they live.
_SUBMODULES = {
    "optim": ".optim",
    "functional": ".core.functional",
    "ops": ".core.ops",
    "nn": ".nn",
    "distributed": ".distributed",
}

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
        value = importlib.import_module(_SUBMODULES[name], __name__)
    else:
        raise AttributeError(f"module 'qlora_rs' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
