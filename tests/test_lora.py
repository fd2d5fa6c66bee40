"""LoRA layers: the fused function against a plain-autograd reference (forward, gradients of x,
A, B; dropout; rslora; init), what the backward saves, one dequantization per backward, the
16-bit LoraLinear, torch.compile without graph breaks, and the adapters' share on CPU inference
(the Rust call against float64 and the ops, when it runs, its errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _lora_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from qlora_rs import InvalidArgumentError, Linear4bit, LoraLinear, LoraLinear4bit


def _base(out_f=48, in_f=64, bias=True, seed=0, compute_dtype=torch.float32) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(in_f, out_f, bias=bias), compute_dtype=compute_dtype)


def _randomize(layer) -> None:
    with torch.no_grad():
        layer.lora_A.weight.normal_(0, 0.1)
        layer.lora_B.weight.normal_(0, 0.1)


def _reference(layer, x, mask=None):
    """The same computation written with plain autograd ops on copies of the tensors."""
    base = layer.base_layer
    w = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.detach().float()
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    xl = xr if mask is None else xr * mask / (1 - layer.dropout)
    y = F.linear(xr, w, base.bias) + F.linear(F.linear(xl, a), b) * layer.scaling
    return y, xr, a, b


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_gradients_match_reference(use_rslora):
    layer = LoraLinear4bit(_base(), r=4, alpha=8, dropout=0.0, use_rslora=use_rslora)
    _randomize(layer)
    assert layer.scaling == (8 / math.sqrt(4) if use_rslora else 8 / 4)
    x = torch.randn(2, 3, 64, requires_grad=True)
    g = torch.randn(2, 3, 48)
    y = layer(x)
    (y * g).sum().backward()
    ref, xr, a, b = _reference(layer, x)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.bias.grad is not None  # from_linear keeps the bias trainable


def test_dropout_mask_is_applied_consistently_and_only_in_training():
    layer = LoraLinear4bit(_base(), r=4, alpha=8, dropout=0.5)
    _randomize(layer)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 48)
    torch.manual_seed(7)
    y = layer(x)
    (y * g).sum().backward()
    torch.manual_seed(7)
    mask = torch.rand(x.shape) >= 0.5  # the function draws its mask the same way
    ref, xr, a, b = _reference(layer, x, mask)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), _reference(layer, x)[0], rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_adapters():
    layer = LoraLinear4bit(_base(compute_dtype=torch.bfloat16), r=8, alpha=16, dropout=0.0)
    _randomize(layer)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref, xr, a, b = _reference(layer, x.float())
    ref.sum().backward()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert layer.lora_A.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=2e-2, atol=2e-2)


def test_inits():
    x = torch.randn(3, 64)
    layer = LoraLinear4bit(_base(), r=8, init="default")
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming_uniform(a=sqrt(5)) bound
    layer.eval()
    assert torch.equal(layer(x), layer.base_layer(x))  # starts as a no-op
    gauss = LoraLinear4bit(_base(), r=8, init="gaussian")
    assert abs(gauss.lora_A.weight.std().item() - 1 / 8) < 0.03 and torch.count_nonzero(gauss.lora_B.weight) == 0
    none = LoraLinear4bit(_base(), r=8, init=False)
    assert torch.count_nonzero(none.lora_B.weight) > 0
    with pytest.raises(InvalidArgumentError, match="init 'pissa' is not supported"):
        LoraLinear4bit(_base(), init="pissa")
    with pytest.raises(InvalidArgumentError, match="r must be a positive integer"):
        LoraLinear4bit(_base(), r=0)
    with pytest.raises(InvalidArgumentError, match="wraps a qlora_rs.Linear4bit, got Linear"):
        LoraLinear4bit(nn.Linear(4, 4))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_backward_saves_x_and_xa_only_and_dequantizes_once():
    layer = LoraLinear4bit(_base(out_f=64, in_f=96, compute_dtype=torch.bfloat16), r=4, dropout=0.1)
    saved = []
    x = torch.randn(8, 96, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= 64 * 96), f"saved a dense {t.dtype} {list(t.shape)}"
    shapes = {tuple(t.shape) for t in saved}
    assert (8, 96) in shapes and (8, 4) in shapes  # x (and its dropout mask), x @ A^T
    counter = _CountOps()
    with counter:
        y.float().sum().backward()
    assert counter.counts.get("qlora_rs.dequantize_4bit") == 1
    assert "qlora_rs.gemm_4bit" not in counter.counts


def test_lora_linear_16bit_matches_reference():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 48), r=4, alpha=4, dropout=0.0)
    _randomize(layer)
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(2, 64, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    ref, xr, a, b = _reference(layer, x)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match=r"LoraLinear .*input float32 \[2, 63\] does not fit"):
        layer(torch.randn(2, 63))


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    layer = LoraLinear4bit(_base(out_f=32, in_f=64, compute_dtype=torch.bfloat16), r=4, dropout=0.1)
    _randomize(layer)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)

    def loss_fn(inp):
        return layer(inp).float().pow(2).mean()

    # fullgraph=True: any graph break is an error
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    compiled(x).backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    layer.eval()  # no dropout: compiled and eager must agree
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    compiled(x).backward()
    eager_x = x.detach().clone().requires_grad_()
    loss_fn(eager_x).backward()
    torch.testing.assert_close(x.grad, eager_x.grad, rtol=1e-2, atol=1e-3)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_torch_compile_fullgraph_forward_backward():
    _compile_check("aot_eager")  # dynamo + AOTAutograd: traces forward and backward through the fake ops


@pytest.mark.slow
def test_torch_compile_inductor():
    _compile_check("inductor")


# ------------------------------------------------------------------ the adapters' share on CPU inference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, k, r, n", [(1, 576, 16, 576), (3, 37, 5, 70), (2, 4096, 64, 1100)])
def test_cpu_lora_add_equals_float64_within_one_rounding(dtype, rows, k, r, n):
    """``y += round(B @ (A @ x) * scaling)``: the float32 share within summation error of float64,
    rounded to y's dtype, then the sum rounded: y lands on one of the two representable values
    around the exact result (the larger sizes share the work among threads)."""
    from qlora_rs import _lib

    g = torch.Generator().manual_seed(rows * k + r)
    x = torch.randn(rows, k, generator=g).to(dtype)
    a, b = torch.randn(r, k, generator=g) * 0.05, torch.randn(n, r, generator=g) * 0.05
    y0 = torch.randn(rows, n, generator=g).to(dtype)
    scaling = 32 / 12
    y = y0.clone()
    _lib.cpu_lora_add(_lib.LoraAdapter(a, b, k, scaling), x, y)
    share = (x.double() @ a.double().T @ b.double().T) * scaling
    exact = y0.double() + share.to(dtype).double()  # the share rounded first, as the ops round it
    # One rounding of the sum; float32 summation error (1e-5 of the terms' magnitudes), and a
    # share that it moves across a rounding boundary rounds one unit away.
    terms = (x.double().abs() @ a.double().abs().T @ b.double().abs().T) * scaling
    bound = torch.finfo(dtype).eps * (exact.abs() + share.abs()) + 1e-5 * terms
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y != y0).any()


def test_cpu_lora_add_names_what_does_not_fit():
    from qlora_rs import _lib

    x, a, b, y = torch.randn(2, 8), torch.randn(4, 8), torch.randn(6, 4), torch.randn(2, 6)
    with pytest.raises(InvalidArgumentError, match="y has 10 elements; .* needs 12"):
        _lib.cpu_lora_add(_lib.LoraAdapter(a, b, 8, 1.0), x, y[:, :5].contiguous())
    with pytest.raises(InvalidArgumentError, match="lora_A is bfloat16, lora_B float32; expected one float dtype"):
        _lib.LoraAdapter(a.bfloat16(), b, 8, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"lora_A has 32 elements and lora_B 24; expected \[rank, 7\]"):
        _lib.LoraAdapter(a, b, 7, 1.0)
    with pytest.raises(InvalidArgumentError, match="shares memory"):
        _lib.cpu_lora_add(_lib.LoraAdapter(a[:, :6].contiguous(), b, 6, 1.0), y, y)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inference_adds_the_share_by_one_call_for_few_rows(lora_dtype, monkeypatch):
    """No grad and no dropout: few rows take the Rust call, more rows the ops; either within
    float32 summation error of the autograd function (bf16 outputs a unit off in rare elements)."""
    from qlora_rs import _lib
    from qlora_rs.nn import lora as lora_module

    layer = LoraLinear4bit(_base(compute_dtype=torch.bfloat16), r=8, alpha=16, lora_dtype=lora_dtype)
    _randomize(layer)
    layer.eval()
    calls = []
    real = _lib.cpu_lora_add
    monkeypatch.setattr(_lib, "cpu_lora_add", lambda *a: calls.append(1) or real(*a))
    limit = lora_module.LORA_KERNEL_MAX_ROWS
    for rows, kernel in ((1, True), (limit, True), (limit + 1, False)):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        before = len(calls)
        with torch.no_grad():
            fast = layer(x)
        function = layer(x).detach()  # grad enabled, the adapters require grad: the autograd function
        assert len(calls) - before == kernel, rows
        close = (fast.float() - function.float()).abs() <= function.float().abs() * 2.0**-7 + 1e-6
        assert close.all() and (fast != function).float().mean() < 0.05, rows


def _quantized(out_f: int, in_f: int):
    import qlora_rs

    return qlora_rs.quantize(torch.randn(out_f, in_f, dtype=torch.bfloat16), "nf4", 64, double_quant=True)


def test_fused_mlp_call_names_an_adapter_that_does_not_fit_and_an_unknown_activation():
    from qlora_rs import _lib
    from qlora_rs.core import ops

    torch.manual_seed(0)
    weights = [ops.cpu_weight(*ops.quant_args(*_quantized(out_f, in_f))) for out_f, in_f in ((96, 64), (96, 64), (64, 96))]
    packed = [w._packed_for(1, torch.bfloat16) for w in weights]
    x, out = torch.randn(1, 64, dtype=torch.bfloat16), torch.empty(1, 64, dtype=torch.bfloat16)
    wrong = _lib.LoraAdapter(torch.randn(4, 64), torch.randn(64, 4), 64, 1.0)  # [64, 64]: not up's [96, 64]
    with pytest.raises(InvalidArgumentError, match=r"up's adapter is for \[64, 64\] \(out x in\); the projection is \[96, 64\]"):
        _lib.cpu_gated_mlp_4bit(*packed, x, out, None, [None, wrong, None])
    with pytest.raises(InvalidArgumentError, match="2 adapters; expected one entry"):
        _lib.cpu_gated_mlp_4bit(*packed, x, out, None, [None, None])
    with pytest.raises(InvalidArgumentError, match=r'activation "relu"; expected "silu" or "gelu_tanh"'):
        _lib.cpu_gated_mlp_4bit(*packed, x, out, None, None, "relu")
