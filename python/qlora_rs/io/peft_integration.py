"""PEFT on models with qlora_rs 4-bit layers.

Importing this module (which loading a model through :class:`qlora_rs.QloraConfig` does, at once
if PEFT is imported and otherwise right after it is) makes PEFT's LoRA wrap every
:class:`qlora_rs.Linear4bit` in :class:`PeftLoraLinear4bit`, as PEFT picks its own layer for a
bitsandbytes ``Linear4bit``: PEFT's
dispatchers recognise bitsandbytes layers by class, which ours cannot be, so
``LoraModel._create_new_module`` gets a first dispatcher for ours. ``get_peft_model``,
``PeftModel.from_pretrained``, ``model.load_adapter`` and TRL's trainers all go through it, so the
usual PEFT code needs nothing from qlora_rs::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora_rs.QloraConfig())
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()

:class:`PeftLoraLinear4bit` runs the fused base + LoRA autograd function for plain LoRA and merges
(``merge``/``unmerge``/``merge_and_unload``) by dequantizing, adding ``B @ A * scaling`` and
re-quantizing. Like bitsandbytes' layer, that rounds, and a small adapter can be rounded away
altogether; each merge pass therefore warns once (:class:`qlora_rs.nn.merge.MergeRoundingWarning`)
with the change it measured and how to merge into a 16-bit base instead.

:func:`register` (the explicit form, for a config object) still works and is no longer needed. A
config that maps ``qlora_rs.Linear4bit`` to another class with ``_register_custom_module`` keeps
that choice (PEFT's generic ``peft.tuners.lora.layer.Linear``, say).
``import qlora_rs`` does not import peft.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..core.autograd import LoraLinear4bitFunction
from ..core.ops import _needs_graph
from ..errors import InvalidArgumentError
from ..nn.lora import _MEMO, _without_memos, add_share
from ..nn.merge import RequantizedMerge
from ..nn.linear4bit import Linear4bit

__all__ = ["PeftLoraLinear4bit", "register"]


class PeftLoraLinear4bit(_PeftLinear):
    """PEFT's LoRA layer for a :class:`qlora_rs.Linear4bit` base (PEFT conventions: adapters by
    name in ``lora_A``/``lora_B`` ModuleDicts, several adapters, merge/unmerge)."""

    def _fusable_adapter(self, kwargs: dict) -> Optional[str]:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fusable_adapter(kwargs)
        if name is None or args or any(v is not None for v in kwargs.values()):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        base: Linear4bit = self.get_base_layer()
        base._check_input(x)
        dropout = self.lora_dropout[name]
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if p == 0.0 and not _needs_graph(a, b) and a.dtype == b.dtype and a.device == b.device:
            y = base._cpu_inference(x)  # CPU inference: the base's kernels, the share as LoraLinear4bit adds it
            if y is not None:
                return add_share(self, f"{_MEMO}_{name}", x, y, a, b, float(self.scaling[name]))
        y = LoraLinear4bitFunction.apply(x.to(base.compute_dtype), a, b, base.bias, float(self.scaling[name]), p,
                                         *base._op_args())
        return y.to(x.dtype)

    def __getstate__(self):
        # Copies and pickles rebuild the held adapters on their first forward.
        return _without_memos(super().__getstate__())

    def _requantize(self, adapter: str, sign: float, safe: bool) -> None:
        base: Linear4bit = self.get_base_layer()
        if adapter in self.lora_variant:
            raise InvalidArgumentError(f"PeftLoraLinear4bit: merging a {type(self.lora_variant[adapter]).__name__} adapter is not supported")
        before = base.dequantize(torch.float32)
        delta = sign * self.get_delta_weight(adapter).float().to(before.device)
        w = before + delta
        if safe and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base.quantize_weight_(w.to(base.weight_dtype))
        merge_pass = _merge_passes[-1] if _merge_passes else None
        record = merge_pass if merge_pass is not None else RequantizedMerge("merging" if sign > 0 else "unmerging")
        record.add(before, delta, base.dequantize(torch.float32))
        if merge_pass is None:
            record.warn(_SIXTEEN_BIT_HINT, via=("peft",))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds the adapters to the 4-bit weight (dequantize, add, re-quantize: rounds, and warns
        with the change it measured)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self._requantize(adapter, 1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._requantize(adapter, -1.0, False)

    def __repr__(self) -> str:
        return "qlora_rs." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Makes PEFT wrap :class:`qlora_rs.Linear4bit` layers in :class:`PeftLoraLinear4bit` for this
    config; returns the config. (Importing this module already does so for every config.)"""
    config._register_custom_module({Linear4bit: PeftLoraLinear4bit})
    return config


_SIXTEEN_BIT_HINT = (
    "Merging into a 16-bit base rounds far more finely: `qlora-rs merge MODEL_DIR ADAPTER_DIR -o OUT` writes one "
    "(the 4-bit weights decoded to 16 bits plus the adapter, what training saw), or load the base without a "
    "quantization_config and call merge_and_unload() there"
)

# The merge passes under way (innermost last): their layers report into one RequantizedMerge, which
# warns once when the pass ends instead of once per layer.
_merge_passes: list[RequantizedMerge] = []


def _collecting(method: Callable, verb: str) -> Callable:
    @functools.wraps(method)
    def run_pass(self: Any, *args: Any, **kwargs: Any) -> Any:
        record = RequantizedMerge(verb)
        _merge_passes.append(record)
        try:
            result = method(self, *args, **kwargs)
        finally:
            _merge_passes.remove(record)
        if record.layers:
            record.warn(_SIXTEEN_BIT_HINT, via=("peft",))
        return result

    run_pass._qlora_rs = True
    return run_pass


def _install() -> None:
    """Puts our dispatcher in front of PEFT's LoRA dispatchers and groups the merge warnings per pass."""
    create = LoraModel.__dict__["_create_new_module"]
    original = create.__func__ if isinstance(create, staticmethod) else create
    if getattr(original, "_qlora_rs", False):
        return

    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: torch.nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if isinstance(base, Linear4bit) and not any(isinstance(base, cls) for cls in custom):
            return PeftLoraLinear4bit(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._qlora_rs = True
    LoraModel._create_new_module = staticmethod(_create_new_module)
    for name, verb in (("merge_adapter", "merging"), ("unmerge_adapter", "unmerging"),
                       ("_unload_and_optionally_merge", "merging")):
        method = getattr(LoraModel, name, None)
        if method is not None and not getattr(method, "_qlora_rs", False):
            setattr(LoraModel, name, _collecting(method, verb))


_install()
