"""PEFT on models quantized by :func:`qlora_rs.quantize_model`.

``peft.get_peft_model(model, LoraConfig(...))`` works on such a model as it is: ``Linear4bit``
is an ``nn.Linear``, so PEFT finds it (``target_modules="all-linear"`` included) and wraps it in
its generic ``lora.Linear``, whose base forward is the 4-bit op. That layer cannot merge (its
merge edits ``weight`` as a dense matrix). :func:`register` makes PEFT use
:class:`PeftLoraLinear4bit` instead (through ``LoraConfig._register_custom_module``, PEFT's hook
for third-party layers): the fused base + LoRA autograd function for plain LoRA, and
``merge``/``unmerge``/``merge_and_unload`` by dequantizing, adding ``B @ A * scaling`` and
re-quantizing (like PEFT's bitsandbytes layer, this rounds)::

    config = qlora_rs.peft_integration.register(LoraConfig(r=16, target_modules="all-linear"))
    model = peft.get_peft_model(qlora_rs.quantize_model(model), config)

This module imports peft; ``import qlora_rs`` does not.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from .autograd import LoraLinear4bitFunction
from .errors import InvalidArgumentError
from .nn.linear4bit import Linear4bit

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
        y = LoraLinear4bitFunction.apply(x.to(base.compute_dtype), a, b, base.bias, float(self.scaling[name]), p,
                                         *base._op_args())
        return y.to(x.dtype)

    def _requantize(self, adapter: str, sign: float, safe: bool) -> None:
        base: Linear4bit = self.get_base_layer()
        if adapter in self.lora_variant:
            raise InvalidArgumentError(f"PeftLoraLinear4bit: merging a {type(self.lora_variant[adapter]).__name__} adapter is not supported")
        w = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float().to(base.weight.device)
        if safe and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base.quantize_weight_(w.to(base.weight_dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds the adapters to the 4-bit weight (dequantize, add, re-quantize: rounds)."""
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
    config; returns the config."""
    config._register_custom_module({Linear4bit: PeftLoraLinear4bit})
    return config
