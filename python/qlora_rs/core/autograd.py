"""Autograd functions over the 4-bit ops, and the functional API built on them.

- :class:`Linear4bitFunction`: ``y = x @ dequant(W)^T + b``. The backward gives the gradient wrt
  ``x`` (and ``b``); it saves only the packed weight and its scales, never a dequantized copy,
  and dequantizes once.
- :class:`LoraLinear4bitFunction`: base + LoRA in one function,
  ``y = x @ dequant(W)^T + b + (dropout(x) @ A^T @ B^T) * scaling``. It saves ``x`` (in the
  compute dtype), the dropout mask, ``x @ A^T`` and the packed weight; the LoRA branch runs in
  the adapters' dtype (float32 by default, as PEFT does) and is cast to the base output's dtype
  before the sum.
- :class:`LoraLinearFunction`: the same around a dense weight (16-bit LoRA baselines).

The functional entry points (:func:`linear_4bit`, :func:`lora_linear_4bit`, :func:`lora_linear`)
take a ``(packed, QuantState)`` pair; the modules in :mod:`qlora_rs.nn` call the functions with
their own tensors directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (defines torch.ops.qlora_rs.*)
from .ops import grad_input_4bit, matmul_dtype, quant_args
from .quant_state import QuantState

__all__ = [
    "Linear4bitFunction",
    "LoraLinear4bitFunction",
    "LoraLinearFunction",
    "linear_4bit",
    "lora_linear_4bit",
    "lora_linear",
]


def _dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mm = matmul_dtype(x.dtype, x.device)
    return F.linear(x.to(mm), weight.to(mm)).to(x.dtype)


def _dense_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mm = matmul_dtype(grad.dtype, grad.device)
    return torch.matmul(grad.to(mm), weight.to(mm)).to(grad.dtype)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


def _dropout_mask(x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    if p <= 0.0:
        return None
    return torch.rand(x.shape, device=x.device) >= p


def _lora_input(x: torch.Tensor, mask: Optional[torch.Tensor], p: float, dtype: torch.dtype) -> torch.Tensor:
    xl = x.to(dtype)
    if mask is not None:
        xl = xl * mask * (1.0 / (1.0 - p))
    return xl


def _lora_forward(x, lora_A, lora_B, scaling: float, p: float):
    """``(dropout(x) @ A^T @ B^T) * scaling`` in the adapters' dtype; also returns ``x @ A^T``
    and the dropout mask for the backward."""
    mask = _dropout_mask(x, p)
    xa = F.linear(_lora_input(x, mask, p, lora_A.dtype), lora_A)
    return F.linear(xa, lora_B) * scaling, xa, mask


def _lora_backward(grad, x, mask, xa, lora_A, lora_B, scaling: float, p: float, need_x: bool, need_A: bool, need_B: bool):
    """Gradients of the LoRA branch: ``(grad_x in grad.dtype or None, grad_A, grad_B)``."""
    ad = lora_A.dtype
    r, in_features = lora_A.shape
    g = grad.reshape(-1, grad.shape[-1]).to(ad) * scaling
    xa2 = xa.reshape(-1, r)
    grad_B = g.t().matmul(xa2) if need_B else None
    grad_x = grad_A = None
    if need_x or need_A:
        gxa = g.matmul(lora_B)
        if need_A:
            grad_A = gxa.t().matmul(_lora_input(x, mask, p, ad).reshape(-1, in_features))
        if need_x:
            gxl = gxa.matmul(lora_A)
            if mask is not None:
                gxl = gxl * mask.reshape(-1, in_features) * (1.0 / (1.0 - p))
            grad_x = gxl.reshape(x.shape).to(grad.dtype)
    return grad_x, grad_A, grad_B


class Linear4bitFunction(torch.autograd.Function):
    """``x @ dequant(W)^T + bias`` in ``x.dtype``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
        y = torch.ops.qlora_rs.gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, bias)
        ctx.meta = (offset, quant_type, blocksize, shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, nested_absmax, nested_code, bias = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input_4bit(grad, packed, absmax, nested_absmax, nested_code, *ctx.meta)
        if bias is not None and ctx.needs_input_grad[1]:
            grad_bias = _bias_grad(grad, bias)
        return (grad_x, grad_bias) + (None,) * 8


class LoraLinear4bitFunction(torch.autograd.Function):
    """Base 4-bit linear + LoRA in one function; see the module docstring."""

    @staticmethod
    def forward(
        ctx, x, lora_A, lora_B, bias, scaling, dropout,
        packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape,
    ):
        y = torch.ops.qlora_rs.gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
        if bias is not None:
            y = y + bias.to(y.dtype)
        lora, xa, mask = _lora_forward(x, lora_A, lora_B, scaling, dropout)
        y = y + lora.to(y.dtype)
        ctx.save_for_backward(x, mask, xa, lora_A, lora_B, bias, packed, absmax, nested_absmax, nested_code)
        ctx.meta = (offset, quant_type, blocksize, shape)
        ctx.lora = (scaling, dropout)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mask, xa, lora_A, lora_B, bias, packed, absmax, nested_absmax, nested_code = ctx.saved_tensors
        scaling, p = ctx.lora
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        grad_x, grad_A, grad_B = _lora_backward(grad, x, mask, xa, lora_A, lora_B, scaling, p, need_x, need_A, need_B)
        if need_x:
            grad_x = grad_x + grad_input_4bit(grad, packed, absmax, nested_absmax, nested_code, *ctx.meta).reshape(x.shape)
        grad_bias = _bias_grad(grad, bias) if bias is not None and need_bias else None
        return (grad_x, grad_A, grad_B, grad_bias) + (None,) * 10


class LoraLinearFunction(torch.autograd.Function):
    """Dense linear + LoRA in one function (the 16-bit baseline); the weight gets a gradient only
    if it requires one (then ``x`` is needed for it anyway)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout):
        y = _dense_linear(x, weight)
        if bias is not None:
            y = y + bias.to(y.dtype)
        lora, xa, mask = _lora_forward(x, lora_A, lora_B, scaling, dropout)
        y = y + lora.to(y.dtype)
        ctx.save_for_backward(x, weight, bias, mask, xa, lora_A, lora_B)
        ctx.lora = (scaling, dropout)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mask, xa, lora_A, lora_B = ctx.saved_tensors
        scaling, p = ctx.lora
        need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x, grad_A, grad_B = _lora_backward(grad, x, mask, xa, lora_A, lora_B, scaling, p, need_x, need_A, need_B)
        if need_x:
            grad_x = grad_x + _dense_grad_input(grad, weight).reshape(x.shape)
        grad_w = None
        if need_w:
            g2 = grad.reshape(-1, grad.shape[-1]).float()
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        grad_bias = _bias_grad(grad, bias) if bias is not None and need_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None


def linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` in ``x.dtype``, differentiable wrt ``x`` and ``bias``."""
    return Linear4bitFunction.apply(x, bias, *quant_args(packed, state))


def lora_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T + bias + (dropout(x) @ lora_A^T @ lora_B^T) * scaling`` in ``x.dtype``
    (the LoRA branch in ``lora_A.dtype``). ``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``;
    ``dropout`` is the probability (pass 0 in eval mode)."""
    return LoraLinear4bitFunction.apply(x, lora_A, lora_B, bias, float(scaling), float(dropout), *quant_args(packed, state))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`lora_linear_4bit` around a dense ``weight`` ``[out, in]`` (computed in ``x.dtype``)."""
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout))
