"""What merging LoRA adapters into 4-bit layers does to them: the per-layer error of a merge
(:class:`MergeError`), the warning when re-quantizing moves the weights (:class:`MergeRoundingWarning`)
and the accounting over one merge pass (:class:`RequantizedMerge`), shared by
:func:`qlora_rs.merge` and the PEFT integration.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import NamedTuple, Sequence

import torch

__all__ = ["MergeError", "MergeRoundingWarning", "RequantizedMerge"]


class MergeError(NamedTuple):
    """How far a merged layer's stored weight is from the exact ``W + B @ A * scaling`` (float32):
    the largest absolute difference and the RMS difference relative to the RMS of the merged weight."""

    max_abs: float
    relative_rms: float


class MergeRoundingWarning(UserWarning):
    """LoRA adapters were merged into 4-bit weights, which re-quantizes them: the merged model
    differs from the model with its adapters by the measured amount."""


class RequantizedMerge:
    """What merging adapters into 4-bit layers did to them, over the layers of one merge.

    ``add(before, delta, after)`` per layer: the decoded 4-bit weight before, the adapter's
    change ``B @ A * scaling`` and the decoded weight after re-quantizing (float32).
    ``adapter_change``: RMS of the adapters' changes relative to RMS of the weights;
    ``rounding``: RMS of ``after - (before + delta)`` relative to RMS of the weights; ``lost``:
    the same relative to RMS of the changes (0: merged exactly; 1 or more: the rounding is as large
    as the adapters, which then hardly count); ``unchanged``: layers whose 4-bit weight came out
    identical, the adapter rounded away entirely.
    """

    def __init__(self, verb: str = "merging") -> None:
        self.verb = verb
        self.layers = 0
        self.unchanged = 0
        self._weight_sq = 0.0
        self._delta_sq = 0.0
        self._error_sq = 0.0

    def add(self, before: torch.Tensor, delta: torch.Tensor, after: torch.Tensor) -> None:
        self.layers += 1
        self.unchanged += bool(torch.equal(after, before))
        self._weight_sq += float(before.double().pow(2).sum())
        self._delta_sq += float(delta.double().pow(2).sum())
        self._error_sq += float((after.double() - before.double() - delta.double()).pow(2).sum())

    @property
    def adapter_change(self) -> float:
        return math.sqrt(self._delta_sq / self._weight_sq) if self._weight_sq > 0 else 0.0

    @property
    def lost(self) -> float:
        return math.sqrt(self._error_sq / self._delta_sq) if self._delta_sq > 0 else 0.0

    @property
    def rounding(self) -> float:
        """RMS of ``after - (before + delta)`` relative to RMS of the weights."""
        return math.sqrt(self._error_sq / self._weight_sq) if self._weight_sq > 0 else 0.0

    def message(self, hint: str) -> str:
        share = (f"{self.lost:.3g} times the adapters' own change: the adapters are lost in the rounding" if self.lost >= 1
                 else f"{100 * self.lost:.3g}% of the adapters' own change")
        away = (f"; in {self.unchanged} of the layers the 4-bit weight came out unchanged, the adapter rounded away "
                "entirely" if self.unchanged else "")
        return (
            f"{self.verb} LoRA adapters into {self.layers} 4-bit layers re-quantized their weights: the adapters change "
            f"those weights by {100 * self.adapter_change:.3g}% (RMS), and re-quantizing leaves them "
            f"{100 * self.rounding:.3g}% (RMS) away from base + adapter, {share}{away}. The model now computes "
            f"something other than the model with its adapters. {hint}."
        )

    def warn(self, hint: str, via: Sequence[str] = ()) -> None:
        """Warns at the first caller outside qlora_rs and the packages named in ``via`` (the user's
        call to merge, however deep inside PEFT the merge ran)."""
        skip = tuple(os.path.dirname(sys.modules[m].__file__) + os.sep for m in ("qlora_rs", *via) if m in sys.modules)
        level, frame = 1, sys._getframe(0)
        while frame is not None and frame.f_code.co_filename.startswith(skip):
            frame, level = frame.f_back, level + 1
        warnings.warn(self.message(hint), MergeRoundingWarning, stacklevel=level)
