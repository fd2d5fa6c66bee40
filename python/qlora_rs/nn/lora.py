"""LoRA adapters: :class:`LoraLinear4bit` around a :class:`Linear4bit` (QLoRA) and
:class:`LoraLinear` around a plain ``nn.Linear`` (the 16-bit LoRA baseline).

``y = base(x) + (dropout(x) @ A^T @ B^T) * scaling`` with ``A`` ``[r, in]``, ``B`` ``[out, r]``
and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), computed by one fused
autograd function. The attribute names follow PEFT's (``base_layer``, ``lora_A.weight``,
``lora_B.weight``), so a model's state-dict keys are PEFT's without the adapter name.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _lib
from ..core.autograd import LoraLinear4bitFunction, LoraLinearFunction
from ..core.ops import _capsule, _needs_graph
from ..errors import InvalidArgumentError
from ..core.quant_state import dtype_name, parse_dtype
from .linear4bit import Linear4bit

__all__ = ["LoraLinear4bit", "LoraLinear", "LORA_INITS"]

LORA_INITS = ("default", "gaussian", "none")

#: Rows up to which CPU inference adds the adapters' share by one Rust call (generation steps,
#: small batches); above, torch's GEMM does the two products faster than dot products would.
LORA_KERNEL_MAX_ROWS = 16


class _LoraLayer(nn.Module):
    """What both LoRA layers share: the adapter matrices, their initialisation and scaling."""

    base_layer: nn.Linear

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        init: Union[str, bool],
        lora_dtype: Any,
    ) -> None:
        super().__init__()
        if int(r) != r or r <= 0:
            raise InvalidArgumentError(f"{type(self).__name__}: r must be a positive integer, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise InvalidArgumentError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        init = {True: "default", False: "none"}.get(init, init) if isinstance(init, bool) else init
        if init not in LORA_INITS:
            raise InvalidArgumentError(
                f"{type(self).__name__}: init {init!r} is not supported: expected one of {', '.join(LORA_INITS)}"
            )
        lora_dtype = parse_dtype(lora_dtype)
        self.base_layer = base
        self.r = int(r)
        self.alpha = alpha
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.init = init
        self.scaling = alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, device=device, dtype=lora_dtype)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """``default``: A Kaiming-uniform (a = sqrt(5)), B zero, so the adapter starts as a no-op;
        ``gaussian``: A normal with std 1/r, B zero; ``none``: both keep ``nn.Linear``'s
        Kaiming-uniform initialisation (an adapter that changes the output from the start)."""
        if self.lora_A.weight.device.type == "meta":
            return
        if self.init == "none":
            self.lora_A.reset_parameters()
            self.lora_B.reset_parameters()
            return
        if self.init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` as a float32 ``[out, in]`` tensor."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _check_adapters(self) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype != b.dtype or a.device != b.device:
            raise InvalidArgumentError(
                f"{self._describe()}: lora_A ({dtype_name(a.dtype)} on {a.device}) and lora_B ({dtype_name(b.dtype)} on "
                f"{b.device}) must share dtype and device"
            )

    def _describe(self) -> str:
        name = getattr(self.base_layer, "_qlora_name", None)
        return f"{type(self).__name__}{f' {name!r}' if name else ''} (in_features={self.in_features}, out_features={self.out_features})"

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}, scaling={self.scaling:g}"


class LoraLinear4bit(_LoraLayer):
    """LoRA around a frozen :class:`Linear4bit`: ``base(x) + (dropout(x) @ A^T @ B^T) * scaling``.

    The base product runs in the base layer's ``compute_dtype``; the adapters are kept and
    applied in ``lora_dtype`` (float32 by default, like PEFT), and the result is returned in the
    input's dtype. The backward dequantizes the 4-bit weight once and saves only the input,
    the dropout mask and ``x @ A^T`` besides the packed weight.
    """

    base_layer: Linear4bit

    def __init__(
        self,
        base: Linear4bit,
        r: int = 64,
        alpha: float = 16,
        dropout: float = 0.05,
        use_rslora: bool = False,
        init: Union[str, bool] = "default",
        lora_dtype: Any = torch.float32,
    ) -> None:
        if not isinstance(base, Linear4bit):
            raise InvalidArgumentError(
                f"LoraLinear4bit wraps a qlora_rs.Linear4bit, got {type(base).__name__}; use LoraLinear for nn.Linear"
            )
        super().__init__(base, r, alpha, dropout, use_rslora, init, lora_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The modules and tensors from their dicts: Module.__getattr__ costs about a microsecond a
        # name, and this runs once per adapted layer and token in generation.
        modules = self._modules
        base = modules["base_layer"]
        a, b = modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]
        p = self.dropout if self.training else 0.0
        if p == 0.0 and not _needs_graph(a, b):
            y = base._cpu_inference(x)
            if y is not None:
                return self._add_adapters(x, y, a, b)
        base._check_input(x)
        self._check_adapters()
        y = LoraLinear4bitFunction.apply(x.to(base.compute_dtype), a, b, base.bias, self.scaling, p, *base._op_args())
        return y.to(x.dtype)

    def _add_adapters(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The rest of :class:`LoraLinear4bitFunction`'s forward without dropout, for chat and
        evaluation on the CPU, given the base's ``y`` from its kernels: :func:`add_share`."""
        if a.dtype != b.dtype or a.device != b.device:
            self._check_adapters()
        return add_share(self, _MEMO, x, y, a, b, self.scaling)

    def __getstate__(self):
        # Copies and pickles rebuild the held adapters on their first forward.
        return _without_memos(super().__getstate__())

    def _inference_share(self, rows: int) -> Any:
        """The held adapters (:func:`held_adapter`) for a Rust call that adds this layer's share to
        its base's product of ``rows`` rows as :meth:`forward` adds it on CPU inference
        (:meth:`_add_adapters`), or None where forward would do otherwise (training with dropout,
        a graph to record, adapters the call does not take). The caller checks the input and
        that no hook of this layer would run."""
        modules = self._modules
        a, b = modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]
        if (self.training and self.dropout) or _needs_graph(a, b) or not _kernel_adds(a, b, rows):
            return None
        return held_adapter(self, _MEMO, a, b, self.scaling)


# Where a layer keeps its held adapters (one per adapter for PEFT's layers: the name appended).
_MEMO = "_cpu_adapter_memo"


def add_share(owner: nn.Module, slot: str, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``y + dropout-free LoRA share`` in ``x``'s dtype, as :class:`LoraLinear4bitFunction`'s
    forward computes it, given the base's fresh ``y`` from its CPU kernels (in the compute dtype)
    and adapters ``a`` ``[r, in]`` and ``b`` ``[out, r]``. Up to :data:`LORA_KERNEL_MAX_ROWS` rows of
    CPU adapters of one float dtype by one Rust call (:func:`qlora_rs._lib.cpu_lora_add` on :func:`held_adapter`:
    the same steps and roundings in its own order of summation, so within float32 summation error
    of the ops; 3.6 us for a 576 -> 16 -> 1536 share, where the ops took ~25); else the function's
    own operations (two small products, the scaling and the sum in place on the fresh ``y``)."""
    xc = x if x.dtype is y.dtype else x.to(y.dtype)
    k = a.shape[1]
    if _kernel_adds(a, b, xc.numel() // k if k else 0) and y.is_contiguous():
        held = held_adapter(owner, slot, a, b, scaling)
        _lib.cpu_lora_add(held, _capsule(xc if xc.is_contiguous() else xc.contiguous()), _capsule(y))
        return y if y.dtype is x.dtype else y.to(x.dtype)
    lora = F.linear(F.linear(xc.to(a.dtype), a), b).mul_(scaling)
    return y.add_(lora.to(y.dtype)).to(x.dtype)


def held_adapter(owner: nn.Module, slot: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Any:
    """``a`` and ``b`` (CPU adapters of one float dtype) and ``scaling`` checked once for the Rust calls (a
    :class:`qlora_rs._lib.LoraAdapter`), kept in ``owner.__dict__[slot]`` while the same tensors, at
    the same address and version, and the same scaling come (an optimizer's step writes a new
    version). The owner drops its slots when copied or pickled (:func:`_without_memos`)."""
    try:
        key = (a.data_ptr(), b.data_ptr(), a._version, b._version, scaling)
    except RuntimeError:  # inference tensors keep no version: built each time
        key = None
    memo = owner.__dict__.get(slot)
    if memo is not None and key is not None and memo[0] is a and memo[1] is b and memo[2] == key:
        return memo[3]
    held = _lib.LoraAdapter(_capsule(a.detach()), _capsule(b.detach()), a.shape[1], scaling)
    if key is not None:
        owner.__dict__[slot] = (a, b, key, held)
    return held


def _without_memos(state: dict) -> dict:
    """A module's ``__getstate__`` without the adapters it holds for the Rust calls."""
    for name in [n for n in state if n.startswith(_MEMO)]:
        del state[name]
    return state


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_adds(a: torch.Tensor, b: torch.Tensor, rows: int) -> bool:
    """Whether CPU inference adds the share of adapters ``a`` and ``b`` for ``rows`` rows by the
    Rust call: CPU tensors of one float dtype laid out plainly, few rows."""
    return (a.dtype is b.dtype and a.dtype in _KERNEL_DTYPES and a.is_cpu and b.is_cpu
            and rows <= LORA_KERNEL_MAX_ROWS and a.is_contiguous() and b.is_contiguous())


class LoraLinear(_LoraLayer):
    """LoRA around a plain ``nn.Linear`` (computed in the linear's weight dtype; 16-bit LoRA)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 64,
        alpha: float = 16,
        dropout: float = 0.05,
        use_rslora: bool = False,
        init: Union[str, bool] = "default",
        lora_dtype: Any = torch.float32,
    ) -> None:
        if not isinstance(base, nn.Linear) or isinstance(base, Linear4bit):
            raise InvalidArgumentError(
                f"LoraLinear wraps an nn.Linear, got {type(base).__name__}; use LoraLinear4bit for Linear4bit"
            )
        super().__init__(base, r, alpha, dropout, use_rslora, init, lora_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != self.in_features:
            what = f"{dtype_name(x.dtype)} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgumentError(
                f"{self._describe()}: input {what} does not fit: expected a floating-point tensor [..., {self.in_features}]"
            )
        self._check_adapters()
        p = self.dropout if self.training else 0.0
        w = base.weight
        y = LoraLinearFunction.apply(x.to(w.dtype), w, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
        return y.to(x.dtype)
