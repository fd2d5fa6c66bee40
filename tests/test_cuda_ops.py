"""CUDA implementations of the 4-bit ops (qlora_rs.cuda_ops).

Argument checks, kernel choice, registration and the Rust launch checks run on any machine; the
`gpu`-marked tests need a CUDA device and a build with kernels, and compare the kernels with the
Rust core's CPU decode (bit for bit) and with a float64 matmul reference."""

from __future__ import annotations

import pytest
import torch

import qlora_rs
from qlora_rs import _lib
from qlora_rs.core import cuda_ops, ops
from qlora_rs.errors import InvalidArgumentError

NEEDS_KERNELS = pytest.mark.skipif(not cuda_ops.KERNELS_COMPILED, reason="built without CUDA kernels")


def quantized(shape, quant_type="nf4", blocksize=64, double_quant=True, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    packed, state = qlora_rs.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return packed, state


op_args = ops.quant_args


# ---------------------------------------------------------------------------------------------
# Any machine.


def check(*args):
    return ops.check_quant_args("test", *args)


def test_argument_checks_name_the_bad_tensor():
    packed, state = quantized((8, 64))
    args = list(op_args(packed, state))
    assert check(*args) == 512
    bad = list(args)
    bad[5] = "nf5"
    with pytest.raises(InvalidArgumentError, match="unsupported quant_type 'nf5'"):
        check(*bad)
    bad = list(args)
    bad[6] = 48
    with pytest.raises(InvalidArgumentError, match="blocksize 48"):
        check(*bad)
    bad = list(args)
    bad[7] = [8, 66]
    with pytest.raises(InvalidArgumentError, match=r"packed weight has 256 bytes .* needs 264"):
        check(*bad)
    bad = list(args)
    bad[1] = state.absmax.float()
    with pytest.raises(InvalidArgumentError, match="absmax is float32 .* needs uint8"):
        check(*bad)
    bad = list(args)
    bad[3] = None
    with pytest.raises(InvalidArgumentError, match="given together"):
        check(*bad)
    bad = list(args)
    bad[2] = torch.zeros(2)
    with pytest.raises(InvalidArgumentError, match="nested_absmax is float32 with 2 entries"):
        check(*bad)
    bad = list(args)
    bad[3] = torch.zeros(255)
    with pytest.raises(InvalidArgumentError, match="nested_code is float32 with 255 entries"):
        check(*bad)
    bad = list(args)
    bad[4] = float("nan")
    with pytest.raises(InvalidArgumentError, match="offset must be finite"):
        check(*bad)
    plain_packed, plain = quantized((3, 32), blocksize=32, double_quant=False)
    plain_args = list(op_args(plain_packed, plain))
    plain_args[1] = plain.absmax[:2]
    with pytest.raises(InvalidArgumentError, match="absmax is float32 with 2 entries.* needs float32 with 3"):
        check(*plain_args)


@NEEDS_KERNELS
def test_cpu_tensors_are_refused_by_name():
    packed, state = quantized((8, 64))
    with pytest.raises(InvalidArgumentError, match="packed is on cpu"):
        cuda_ops.dequantize_4bit_cuda(*op_args(packed, state), torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="x is on cpu"):
        cuda_ops.gemm_4bit_cuda(torch.zeros(2, 64, dtype=torch.bfloat16), *op_args(packed, state))
    with pytest.raises(InvalidArgumentError, match="kernel must be one of"):
        cuda_ops.gemm_4bit_cuda(torch.zeros(2, 64), *op_args(packed, state), kernel="cublas")


def test_kernel_choice():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert cuda_ops.choose_gemm_kernel(1, 4096, bf16) == "gemv"
    assert cuda_ops.choose_gemm_kernel(cuda_ops.GEMV_MAX_M, 4096, f16) == "gemv"
    assert cuda_ops.choose_gemm_kernel(cuda_ops.GEMV_MAX_M + 1, 4096, bf16) == "mma"
    assert cuda_ops.choose_gemm_kernel(cuda_ops.FUSED_GEMM_MAX_M, 4096, f16) == "mma"
    assert cuda_ops.GEMV_MAX_M <= _lib.CUDA_GEMV_MAX_M
    assert cuda_ops.choose_gemm_kernel(cuda_ops.FUSED_GEMM_MAX_M + 1, 4096, bf16) == "dequant"
    assert cuda_ops.choose_gemm_kernel(1, 4096, f32) == "dequant"
    assert cuda_ops.choose_gemm_kernel(1, 4100, bf16) == "dequant"  # K not a multiple of 32
    assert cuda_ops.FUSED_GEMM_MAX_M <= _lib.CUDA_FUSED_GEMM_MAX_M


def test_rust_launch_checks_run_before_any_driver_call():
    # Argument errors surface as InvalidArgumentError on any machine, GPU or not.
    with pytest.raises(InvalidArgumentError, match="unsupported blocksize 48"):
        _lib.cuda_dequantize_4bit(0, 0, 4096, 8192, None, None, 0.0, 64, "nf4", 48, 16384, "bfloat16")
    with pytest.raises(InvalidArgumentError, match="both nested_absmax and nested_code"):
        _lib.cuda_dequantize_4bit(0, 0, 4096, 8192, 64, None, 0.0, 64, "nf4", 64, 16384, "bfloat16")
    common = dict(device=0, stream=0, x_ptr=4096, n=64, k=64, dtype="bfloat16", packed_ptr=8192, absmax_ptr=64,
                  nested_absmax_ptr=None, nested_code_ptr=None, offset=0.0, quant_type="nf4", blocksize=64,
                  out_ptr=16384)
    with pytest.raises(InvalidArgumentError, match="1 to 16 rows"):
        _lib.cuda_gemm_4bit(m=17, **common)
    with pytest.raises(InvalidArgumentError, match="1 to 4 rows"):
        _lib.cuda_gemm_4bit(m=5, kernel="simt", **common)
    with pytest.raises(InvalidArgumentError, match="1 to 8 rows"):
        _lib.cuda_gemm_4bit(m=9, kernel="gemv", **common)
    with pytest.raises(InvalidArgumentError, match="multiple of 32"):
        _lib.cuda_gemm_4bit(m=1, **{**common, "k": 40})
    with pytest.raises(InvalidArgumentError, match="16-byte aligned"):
        _lib.cuda_gemm_4bit(m=1, **{**common, "x_ptr": 4098})
    with pytest.raises(InvalidArgumentError, match="float32"):
        _lib.cuda_gemm_4bit(m=1, **{**common, "dtype": "float32"})
    with pytest.raises(InvalidArgumentError, match="warps must be"):
        _lib.cuda_gemm_4bit(m=1, warps=3, **common)
    with pytest.raises(InvalidArgumentError, match=r"gemv GEMM warps must be one of \[8, 16, 32\], got 4"):
        _lib.cuda_gemm_4bit(m=1, kernel="gemv", warps=4, **common)


def test_gemv_warps_follow_the_blocks_per_multiprocessor(monkeypatch):
    # 16-row blocks against an H200's 132 multiprocessors: up to one a multiprocessor 32 warps,
    # up to three 16, else 8 (the order benches/gpu_variants.py measured).
    assert [cuda_ops.gemv_warps(n, 132) for n in (16, 1024, 2112, 2113, 4096, 6336, 6337, 8192, 14336)] == [
        32, 32, 32, 16, 16, 16, 8, 8, 8]
    monkeypatch.setattr(cuda_ops, "GEMV_WARPS", 16)
    assert cuda_ops.gemv_warps(1024, 132) == 16


_TEST_NS = "qlora_rs_cudatest"


def _define_test_ops():
    if cuda_ops._op_defined(_TEST_NS, "dequantize_4bit"):
        return
    torch.library.define(
        f"{_TEST_NS}::dequantize_4bit",
        "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, str quant_type, "
        "int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor",
    )
    torch.library.define(
        f"{_TEST_NS}::gemm_4bit",
        "(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
        "str quant_type, int blocksize, SymInt[] shape) -> Tensor",
    )


def test_registration_behind_the_op_schemas():
    assert not cuda_ops.register("qlora_rs_no_such_namespace")
    _define_test_ops()
    registered = cuda_ops.register(_TEST_NS)
    assert registered == cuda_ops.KERNELS_COMPILED
    for op in ("dequantize_4bit", "gemm_4bit"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{_TEST_NS}::{op}", "CUDA")
        assert has == cuda_ops.KERNELS_COMPILED
    assert cuda_ops.register(_TEST_NS) == registered  # idempotent, no re-registration warning


def test_the_qlora_rs_ops_get_the_cuda_kernels():
    assert cuda_ops._op_defined("qlora_rs", "dequantize_4bit")  # defined by qlora_rs.ops (imported above)
    cuda_ops.register()
    has = torch._C._dispatch_has_kernel_for_dispatch_key("qlora_rs::dequantize_4bit", "CUDA")
    assert has == cuda_ops.KERNELS_COMPILED


# ---------------------------------------------------------------------------------------------
# GPU.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def cuda_args(packed, state):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in op_args(packed, state))


@pytest.mark.gpu
@NEEDS_KERNELS
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 96), 64), ((1000, 333), 128), ((7,), 32), ((3, 4096), 4096), ((257, 1024), 32)])
def test_dequantize_is_bit_exact_with_the_cpu(quant_type, double_quant, shape, blocksize):
    packed, state = quantized(shape, quant_type, blocksize, double_quant, seed=sum(shape))
    args = cuda_args(packed, state)
    for dtype in DTYPES:
        want = qlora_rs.dequantize(packed, state, dtype)
        got = cuda_ops.dequantize_4bit_cuda(*args, dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(bits(got.cpu()), bits(want)), (quant_type, double_quant, shape, dtype)


@pytest.mark.gpu
@NEEDS_KERNELS
def test_dequantize_unaligned_and_storage_views():
    packed, state = quantized((33, 70), "nf4", 64, True, seed=3)
    args = list(cuda_args(packed, state))
    # A packed buffer at an odd address takes the element-wise path.
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:].copy_(args[0].reshape(-1))
    args[0] = buf[1:]
    want = qlora_rs.dequantize(packed, state, torch.bfloat16)
    got = cuda_ops.dequantize_4bit_cuda(*args, torch.bfloat16)
    assert torch.equal(bits(got.cpu()), bits(want))
    # bf16 "quant storage" of the same bytes, in bitsandbytes' layout ([bytes / 2, 1]).
    even, st = quantized((16, 64), "fp4", 64, False, seed=4)
    a = list(cuda_args(even, st))
    a[0] = a[0].reshape(-1, 2).view(torch.bfloat16)
    got = cuda_ops.dequantize_4bit_cuda(*a, torch.float16)
    assert torch.equal(bits(got.cpu()), bits(qlora_rs.dequantize(even, st, torch.float16)))


def reference_error(x, w, got):
    """||got - ref|| / ||ref|| and the same for torch's own product in x.dtype (the budget)."""
    ref = x.double() @ w.double().t()
    own = (x @ w.t()).double()
    return ((got.double() - ref).norm() / ref.norm()).item(), ((own - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@NEEDS_KERNELS
@pytest.mark.parametrize("kernel", ["gemv", "mma", "simt", "auto", "dequant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,blocksize", [(256, 512, 64), (33, 96, 64), (1000, 4128, 128), (17, 64, 32)])
def test_gemm_matches_a_float64_reference(kernel, dtype, n, k, blocksize):
    packed, state = quantized((n, k), "nf4", blocksize, True, dtype=dtype, seed=n + k)
    args = cuda_args(packed, state)
    w = cuda_ops.dequantize_4bit_cuda(*args, dtype)
    ms = {"simt": [1, 3, 4], "gemv": [1, 2, 5, 7, 8]}.get(kernel, [1, 2, 5, 8, 9, 16])
    for m in ms:
        x = torch.randn(m, k, device="cuda").to(dtype)
        for warps in {"mma": (None, 1, 16), "gemv": (None, 8, 16, 32)}.get(kernel, (None,)):
            got = cuda_ops.gemm_4bit_cuda(x, *args, kernel=kernel, warps=warps)
            assert got.shape == (m, n) and got.dtype == dtype
            err, budget = reference_error(x, w, got)
            assert err <= 2 * budget + 1e-6, (kernel, warps, m, n, k, err, budget)


@pytest.mark.gpu
@NEEDS_KERNELS
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gemv_every_table_and_scale_form(quant_type, double_quant):
    """The tensor-core GEMV reads its table through PRMT-built addresses: every type's table, plain
    and double-quantized scales, a block size of 128 and rows that do not fill the last 16-row tile;
    every output finite (an element left unwritten holds whatever the allocator gave)."""
    for n, k, blocksize in [(40, 256, 64), (24, 384, 128)]:
        packed, state = quantized((n, k), quant_type, blocksize, double_quant, seed=n + k)
        args = cuda_args(packed, state)
        w = cuda_ops.dequantize_4bit_cuda(*args, torch.bfloat16)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            got = cuda_ops.gemm_4bit_cuda(x, *args, kernel="gemv")
            assert torch.isfinite(got).all()
            err, budget = reference_error(x, w, got)
            assert err <= 2 * budget + 1e-6, (quant_type, double_quant, n, k, m, err, budget)


@pytest.mark.gpu
@NEEDS_KERNELS
def test_gemm_batched_input_and_large_m():
    packed, state = quantized((128, 256), "nf4", 64, True, seed=7)
    args = cuda_args(packed, state)
    w = cuda_ops.dequantize_4bit_cuda(*args, torch.bfloat16)
    for lead in [(2, 3), (4, 8), (100,)]:
        x = torch.randn(*lead, 256, device="cuda", dtype=torch.bfloat16)
        got = cuda_ops.gemm_4bit_cuda(x, *args)
        assert got.shape == (*lead, 128)
        err, budget = reference_error(x.reshape(-1, 256), w, got.reshape(-1, 128))
        assert err <= 2 * budget + 1e-6


@pytest.mark.gpu
@NEEDS_KERNELS
def test_side_streams_and_graph_capture():
    packed, state = quantized((512, 1024), "nf4", 64, True, seed=11)
    args = cuda_args(packed, state)
    want = qlora_rs.dequantize(packed, state, torch.bfloat16)
    streams = [torch.cuda.Stream() for _ in range(3)]
    outs = []
    for s in streams:
        with torch.cuda.stream(s):
            outs.append([cuda_ops.dequantize_4bit_cuda(*args, torch.bfloat16) for _ in range(4)])
    torch.cuda.synchronize()
    for group in outs:
        for o in group:
            assert torch.equal(bits(o.cpu()), bits(want))
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    eager = cuda_ops.gemm_4bit_cuda(x, *args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_ops.gemm_4bit_cuda(x, *args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_ops.gemm_4bit_cuda(x, *args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.gpu
@NEEDS_KERNELS
def test_ops_dispatch_to_the_kernels():
    cuda_ops.register()
    packed, state = quantized((64, 128), "nf4", 64, True, seed=5)
    args = cuda_args(packed, state)
    got = torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16)
    assert torch.equal(bits(got.cpu()), bits(qlora_rs.dequantize(packed, state, torch.bfloat16)))
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.qlora_rs.gemm_4bit(x, *args)
    assert torch.equal(y, cuda_ops.gemm_4bit_cuda(x, *args))


@pytest.mark.gpu
@NEEDS_KERNELS
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    packed, state = quantized((64, 128), "nf4", 64, True, seed=6)
    args = tuple(a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in op_args(packed, state))
    with torch.cuda.device(0):
        got = cuda_ops.dequantize_4bit_cuda(*args, torch.bfloat16)
    assert got.device == torch.device("cuda:1")
    assert torch.equal(bits(got.cpu()), bits(qlora_rs.dequantize(packed, state, torch.bfloat16)))
