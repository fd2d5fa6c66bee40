"""torch.ops.qlora_rs.dequantize_4bit / gemm_4bit: exactness against the Rust core and the
pure-torch decode, fake (meta) implementations, autograd, argument errors, CUDA fallback."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_rs
from _lora_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from qlora_rs import InvalidArgumentError
from qlora_rs.core import ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@settings(max_examples=25)
@given(
    n=st.integers(1, 700),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_dequantize_op_and_torch_decode_are_bit_exact(n, quant_type, blocksize, double_quant, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 3
    packed, state = qlora_rs.quantize(w, quant_type, blocksize, double_quant)
    ref = qlora_rs.dequantize(packed, state, dtype)
    got = torch.ops.qlora_rs.dequantize_4bit(*ops.quant_args(packed, state), dtype)
    assert got.dtype == dtype and got.shape == (n,)
    assert torch.equal(_bits(got), _bits(ref))
    # the decode that serves CUDA tensors until kernels are registered, run here on CPU tensors
    torch_decode = ops._dequantize_torch(*ops.quant_args(packed, state), dtype)
    assert torch.equal(_bits(torch_decode), _bits(ref))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_dequantize_accepts_a_float_storage_view(storage):
    w = torch.randn(48, 64)
    packed, state = qlora_rs.quantize(w)
    view = packed.reshape(-1).view(storage).reshape(-1, 1)
    args = list(ops.quant_args(packed, state))
    args[0] = view
    got = torch.ops.qlora_rs.dequantize_4bit(*args, torch.float32)
    assert torch.equal(got, qlora_rs.dequantize(packed, state, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_matches_dense_product(dtype):
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    packed, state = qlora_rs.quantize(w)
    x = torch.randn(3, 5, 96).to(dtype)
    y = ops.gemm_4bit(x, packed, state)
    ref = (x.float() @ qlora_rs.dequantize(packed, state, dtype).float().T).to(dtype)
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def test_gemm_autograd_gives_input_gradient():
    torch.manual_seed(0)
    packed, state = qlora_rs.quantize(torch.randn(24, 32), double_quant=False)
    w = qlora_rs.dequantize(packed, state, torch.float32)
    x = torch.randn(7, 32, requires_grad=True)
    g = torch.randn(7, 24)
    (ops.gemm_4bit(x, packed, state) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ops._make_autograd_impl is None, reason="this torch lacks the generated autograd wrapper")
def test_gemm_autograd_kernel_calls_the_cpu_kernel_at_once_only_without_a_graph(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    packed, state = qlora_rs.quantize(torch.randn(24, 32))
    args = ops.quant_args(packed, state)
    direct = []
    kernel = ops._gemm_cpu  # the one registered for the CPU key, which the redispatch reaches

    def counted(*a):
        direct.append(1)
        return kernel(*a)

    monkeypatch.setattr(ops, "_gemm_cpu", counted)
    x = torch.randn(5, 32)
    expected = kernel(x, *args)
    with torch.no_grad():
        y = torch.ops.qlora_rs.gemm_4bit(x.requires_grad_(), *args)
    assert direct == [1] and torch.equal(y, expected) and y.grad_fn is None
    x.requires_grad_(False)
    assert torch.equal(torch.ops.qlora_rs.gemm_4bit(x, *args), expected) and direct == [1, 1]

    # A graph to record: through the wrapper torch generates, as register_autograd would.
    xg = x.clone().requires_grad_()
    y = torch.ops.qlora_rs.gemm_4bit(xg, *args)
    assert direct == [1, 1] and y.grad_fn is not None and torch.equal(y.detach(), expected)
    y.sum().backward()
    assert xg.grad is not None
    nested = args[2].clone().requires_grad_()  # a float scale that wants a gradient (which it gets as None)
    y = torch.ops.qlora_rs.gemm_4bit(x, *args[:2], nested, *args[3:])
    assert direct == [1, 1] and y.requires_grad and torch.equal(y.detach(), expected)

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, a=(), kwargs=None):
            self.calls.append(str(func))
            return func(*a, **(kwargs or {}))

    with torch.no_grad(), Recorder() as recorder:  # a mode: its key comes before the CPU kernel's
        y = torch.ops.qlora_rs.gemm_4bit(x, *args)
    assert direct == [1, 1] and recorder.calls == ["qlora_rs.gemm_4bit.default"] and torch.equal(y, expected)


def test_gemm_under_vmap_equals_the_loop():
    # No batching rule: torch's fallback calls the op on each slice, through its Autograd kernel.
    packed, state = qlora_rs.quantize(torch.randn(24, 32), double_quant=True)
    args = ops.quant_args(packed, state)
    x = torch.randn(4, 3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch says that it falls back to a loop
        y = torch.vmap(lambda xi: torch.ops.qlora_rs.gemm_4bit(xi, *args))(x)
    assert torch.equal(y, torch.stack([torch.ops.qlora_rs.gemm_4bit(xi, *args) for xi in x]))


def test_fake_implementations_give_shapes_on_meta():
    packed, state = qlora_rs.quantize(torch.randn(24, 32))
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in ops.quant_args(packed, state)]
    w = torch.ops.qlora_rs.dequantize_4bit(*meta, torch.bfloat16)
    assert w.device.type == "meta" and w.shape == (24, 32) and w.dtype == torch.bfloat16
    y = torch.ops.qlora_rs.gemm_4bit(torch.empty(2, 3, 32, device="meta", dtype=torch.float16), *meta)
    assert y.device.type == "meta" and y.shape == (2, 3, 24) and y.dtype == torch.float16


def test_opcheck_schemas_fake_and_autograd():
    packed, state = qlora_rs.quantize(torch.randn(8, 64))
    args = ops.quant_args(packed, state)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.qlora_rs.dequantize_4bit.default, (*args, torch.float32), test_utils=tests)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.qlora_rs.gemm_4bit.default, (x, *args), test_utils=tests)


def test_bad_arguments_name_what_is_wrong():
    packed, state = qlora_rs.quantize(torch.randn(8, 64))
    args = list(ops.quant_args(packed, state))
    with pytest.raises(InvalidArgumentError, match=r"packed weight has 255 bytes .* needs 256"):
        torch.ops.qlora_rs.dequantize_4bit(packed[:-1], *args[1:], torch.float32)
    with pytest.raises(InvalidArgumentError, match="absmax is float32 with 8 entries"):
        torch.ops.qlora_rs.dequantize_4bit(packed, state.absmax.float(), *args[2:], torch.float32)
    with pytest.raises(InvalidArgumentError, match="dtype int32 is not supported"):
        torch.ops.qlora_rs.dequantize_4bit(*args, torch.int32)
    with pytest.raises(InvalidArgumentError, match=r"x has shape \[3, 63\].*needs its last dimension to be 64"):
        torch.ops.qlora_rs.gemm_4bit(torch.randn(3, 63), *args)
    with pytest.raises(InvalidArgumentError, match="unsupported quant_type 'nf5'"):
        torch.ops.qlora_rs.dequantize_4bit(*args[:5], "nf5", *args[6:], torch.float32)


def test_matmul_dtype_keeps_float32_and_gpu_dtypes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ops.matmul_dtype(torch.float32, cpu) == torch.float32
    assert ops.matmul_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert ops.matmul_dtype(torch.bfloat16, cpu) in (torch.bfloat16, torch.float32)


def test_fallback_logs_the_slow_path_once(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_slow_path_logged", set())
    packed, state = qlora_rs.quantize(torch.randn(8, 64))
    args = ops.quant_args(packed, state)
    with caplog.at_level(logging.WARNING, logger="qlora_rs"):
        a = ops._dequantize_fallback(*args, torch.float32)
        b = ops._gemm_fallback(torch.randn(2, 64), *args)
    assert [r.getMessage() for r in caplog.records if "slow" in r.getMessage()].__len__() == 1
    assert torch.equal(a, qlora_rs.dequantize(packed, state, torch.float32)) and b.shape == (2, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_ops_match_cpu(double_quant):
    torch.manual_seed(0)
    packed, state = qlora_rs.quantize(torch.randn(96, 160), double_quant=double_quant)
    ref = qlora_rs.dequantize(packed, state, torch.bfloat16)
    cuda_args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in ops.quant_args(packed, state)]
    got = torch.ops.qlora_rs.dequantize_4bit(*cuda_args, torch.bfloat16)
    assert torch.equal(_bits(got.cpu()), _bits(ref))
    x = torch.randn(4, 160, dtype=torch.bfloat16)
    y = torch.ops.qlora_rs.gemm_4bit(x.cuda(), *cuda_args).cpu().float()
    torch.testing.assert_close(y, (x.float() @ ref.float().T), rtol=2e-2, atol=2e-2)
