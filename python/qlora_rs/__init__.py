"""qlora-rs: QLoRA with a Rust core — bitsandbytes-compatible NF4/FP4 quantization with double
quantization, 4-bit linear layers with LoRA adapters, paged optimizers, checkpoint conversion.

Only the Rust extension and the exceptions load eagerly; everything else (and with it torch and
transformers) is imported on first use, so `qlora-rs convert` starts in milliseconds.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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
    set with ``QLORA_RS_NUM_THREADS``), ``layer_threads`` and ``layer_team_size`` (where the per-layer
    CPU kernels run: ``"openmp"``, the OpenMP team of PyTorch's own CPU ops, ``torch.get_num_threads()``
    threads capped by ``threads``; or ``"rayon"``), and the CUDA architectures and nvcc version when
    built with kernels."""
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


# Modules that moved when the package was put in layers: their old paths stay importable
# (``from qlora_rs.inference import generate``, ``python -m qlora_rs.datasets``) and name the very
# same module objects, so code and patches written against the old layout keep working. (``qlora_rs.train``
# is the function, as it always was; its module is ``qlora_rs.training.train``.)
_MOVED = {
    "adapter": ".surgery.adapter",
    "autograd": ".core.autograd",
    "calibrate": ".io.calibrate",
    "chat_demo": ".training.chat_demo",
    "cli_chat": ".cli.chat",
    "cli_eval": ".cli.eval",
    "cli_merge": ".cli.merge",
    "cli_plan": ".cli.plan",
    "cli_train": ".cli.train",
    "convert": ".io.convert",
    "cuda_ops": ".core.cuda_ops",
    "data": ".io.data",
    "datasets": ".training.datasets",
    "evaluation": ".training.evaluation",
    "functional": ".core.functional",
    "gguf_metadata": ".io.gguf_metadata",
    "hf_quantizer": ".io.hf_quantizer",
    "inference": ".training.inference",
    "loading": ".io.loading",
    "memory_plan": ".training.memory_plan",
    "model": ".surgery.model",
    "ops": ".core.ops",
    "peft_integration": ".io.peft_integration",
    "quant_state": ".core.quant_state",
    "train_demo": ".training.train_demo",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``qlora_rs.<old name>`` to the module at its new path (see ``_MOVED``)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MOVED:
            return None
        moved = importlib.util.find_spec(_MOVED[name], __name__)
        spec = importlib.util.spec_from_loader(fullname, self, is_package=moved.submodule_search_locations is not None)
        spec.submodule_search_locations = moved.submodule_search_locations  # `python -m` finds __main__
        return spec

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(_MOVED[spec.name.rpartition(".")[2]], __name__)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's spec
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = module.__spec__.loader_state  # already executed: give it back its own spec


sys.meta_path.append(_MovedModuleFinder())
