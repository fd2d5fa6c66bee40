"""The CPU kernels over packed 4-bit weights (rust/matmul4): the fused matmul against dequantize +
a float64 product, for every quant type, with and without double quantization, rows of any
length, partial last blocks, 1..16 activation rows, each float type and each instruction-set
level this CPU runs and, on an emulated CPU, the AVX-512 levels it lacks; the decode, bit for bit
on every level; the crossover in ``torch.ops.qlora_rs.gemm_4bit``; and ``Linear4bit``'s
checked-once inference path."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import pickle
import subprocess
import sys
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import emulated_cpu
import qlora_rs
from _reference import dequantize as reference_dequantize
from qlora_rs.core import ops
from qlora_rs.errors import InvalidArgumentError
from qlora_rs.nn import Linear4bit

ISAS = ops.cpu_isas()
ALL_ISAS = ["avx512bf16", "avx512", "avx2", "portable"]
# Levels this CPU lacks run on an emulated CPU where one is to be had (tests/emulated_cpu.py), so
# that the AVX-512 kernels are tested on every machine, not only on AVX-512 ones.
EMULATOR = emulated_cpu.emulator()
EMULATED = [] if isinstance(EMULATOR, str) else [isa for isa in EMULATOR.levels if isa not in ISAS]
TESTED = [isa for isa in ALL_ISAS if isa in ISAS or isa in EMULATED]
QUANT_TYPES = ["nf4", "fp4", "int4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Half a unit in the last place of each output type: the one rounding of the float32 sum.
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def isa_param(isa: str):
    if isa in TESTED:
        return isa
    why = f"no CPU emulator ({EMULATOR})" if isinstance(EMULATOR, str) else "nor does the emulated one"
    return pytest.param(isa, marks=pytest.mark.skip(reason=f"this CPU does not run {isa}; {why}"))


@contextlib.contextmanager
def on_level(isa: str):
    """Within: the kernels run at ``isa`` natively, or on the emulated CPU if this one lacks it."""
    if isa in ISAS:
        yield
    else:
        with EMULATOR.installed():
            yield


ISA_PARAMS = [isa_param(isa) for isa in ALL_ISAS]


def quantized(n_out: int, k: int, quant_type: str, blocksize: int, double_quant: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g) * torch.rand(n_out, 1, generator=g)
    return qlora_rs.quantize(w, quant_type, blocksize, double_quant)


def reference_weight(packed, state) -> torch.Tensor:
    """float32 [out, in] from the pure-torch reference decode (scales decoded in torch ops)."""
    if state.nested:
        nested = state.nested_absmax.repeat_interleave(256)[: state.absmax.numel()]
        scales = state.nested_code[state.absmax.long()] * nested
        scales = scales + torch.tensor(state.offset, dtype=torch.float32)
    else:
        scales = state.absmax
    n_out, k = state.shape
    return reference_dequantize(packed, scales, state.quant_type, state.blocksize, n_out * k, torch.float32).reshape(n_out, k)


def kernel_weight(w: torch.Tensor, isa: Optional[str], dtype: torch.dtype) -> torch.Tensor:
    """The weight the fused kernels multiply at ``isa`` (None: the level this process runs):
    bfloat16 activations on ``avx512bf16`` take it rounded to bfloat16 where
    :func:`ops.cpu_bf16_products` says so (``vdpbf16ps``); every other case the float32 decode."""
    if dtype == torch.bfloat16 and (isa or ops.cpu_isa()) == "avx512bf16" and ops.cpu_bf16_products():
        return w.to(torch.bfloat16).float()
    return w


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``y`` against ``x @ w^T`` in float64. Allowed: twice the error of float32 dequantize +
    F.linear on the same values (the reference's own error), a float32 summation bound, and the
    output type's rounding."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    own = (F.linear(x.float(), w).double() - exact).abs().max()
    k = x.shape[-1]
    tol = 2 * own + magnitude * (4 * max(k, 1) ** 0.5 * 2.0**-24) + exact.abs() * OUTPUT_ROUNDING[y.dtype] + 1e-30
    err = (y.double() - exact).abs()
    assert y.shape == exact.shape and y.dtype == x.dtype
    assert bool((err <= tol).all()), f"max error {err.max():.3g} (tolerance there {tol.flatten()[err.argmax()]:.3g})"


# ---------------------------------------------------------------------------------------------
# The fused matmul


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "m,n_out,k,blocksize",
    [
        (1, 64, 96, 64),  # whole groups, blocks aligned with rows
        (3, 37, 160, 128),  # rows start in the middle of blocks; leftover rows of a tile
        (5, 19, 77, 32),  # odd rows: they start mid-byte; partial last block; the portable kernel
        (16, 9, 4096, 4096),  # one block per row, the most activation rows
    ],
)
def test_fused_matmul_matches_the_reference(isa, quant_type, double_quant, m, n_out, k, blocksize):
    packed, state = quantized(n_out, k, quant_type, blocksize, double_quant, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    with on_level(isa):
        y = ops.gemm_4bit_cpu(x, *ops.quant_args(packed, state), isa=isa)
    assert_matches_reference(y, x, reference_weight(packed, state))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_float_type_in_and_out(isa, dtype):
    packed, state = quantized(48, 128, "nf4", 64, True)
    x = torch.randn(2, 3, 128).to(dtype)  # leading dimensions are rows
    with on_level(isa):
        y = ops.gemm_4bit_cpu(x, *ops.quant_args(packed, state), isa=isa)
    assert y.shape == (2, 3, 48)
    assert_matches_reference(y.reshape(6, 48), x.reshape(6, 128), kernel_weight(reference_weight(packed, state), isa, dtype))


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_every_row_count_up_to_16(isa):
    packed, state = quantized(21, 256, "fp4", 64, True)
    w = kernel_weight(reference_weight(packed, state), isa, torch.bfloat16)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    args = ops.quant_args(packed, state)
    for m in range(1, 17):
        with on_level(isa):
            y = ops.gemm_4bit_cpu(x[:m], *args, isa=isa)
        assert_matches_reference(y, x[:m], w)


def test_large_products_split_over_threads_cover_every_row():
    # Above the kernel's parallel threshold: the row tasks must tile the output exactly.
    packed, state = quantized(1030, 1024, "nf4", 64, True)
    x = torch.randn(2, 1024)
    assert_matches_reference(ops.gemm_4bit_cpu(x, *ops.quant_args(packed, state)), x, reference_weight(packed, state))


def test_layer_kernels_run_on_torchs_openmp_team_with_its_thread_count():
    # PyTorch's CPU ops run on GNU OpenMP, whose threads spin after each op: the per-layer kernels
    # use that team (crate::threads), sized by torch.set_num_threads, and give the same bits as
    # on one thread or on the rayon pool (QLORA_RS_OPENMP=0, in a fresh process).
    if not sys.platform.startswith("linux"):
        pytest.skip("the OpenMP team is looked up in a Linux process")
    assert qlora_rs.build_info()["layer_threads"] == "openmp"
    packed, state = quantized(1030, 1024, "nf4", 64, True)
    args = ops.quant_args(packed, state)
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    # 8.4 M bf16 values, over 16 MiB: decoded in parallel chunks, streamed into a buffer in use.
    big_packed, big_state = quantized(2048, 4100, "nf4", 64, True)
    big = ops.quant_args(big_packed, big_state)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert qlora_rs.build_info()["layer_team_size"] == min(threads, qlora_rs.build_info()["threads"])
            # A new tensor (written through the cache) and a buffer in use (streamed past it).
            buffer = torch.full(tuple(big_state.shape), 7.0, dtype=torch.bfloat16)
            results[threads] = (ops.gemm_4bit_cpu(x, *args), ops.dequantize_4bit_cpu(*big, torch.bfloat16),
                                ops.dequantize_4bit_cpu(*big, torch.bfloat16, out=buffer))
    finally:
        torch.set_num_threads(before)
    want = reference_weight(big_packed, big_state).to(torch.bfloat16)
    for got in (*results[1][1:], *results[2][1:]):
        assert torch.equal(got, want)
    assert torch.equal(results[1][0], results[2][0])
    code = (
        "import sys, torch, qlora_rs; from qlora_rs.core import ops; torch.manual_seed(0); "
        "w = torch.randn(1030, 1024); p, s = qlora_rs.quantize(w, 'nf4', 64, double_quant=True); "
        "x = torch.randn(3, 1024, dtype=torch.bfloat16); y = ops.gemm_4bit_cpu(x, *ops.quant_args(p, s)); "
        "print(qlora_rs.build_info()['layer_threads'], float(y.double().sum()), float((y.double() ** 2).sum()))"
    )
    runs = {}
    for flag in ("1", "0"):
        env = dict(os.environ, QLORA_RS_OPENMP=flag)
        runs[flag] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert runs["1"][0] == "openmp" and runs["0"][0] == "rayon"
    assert runs["1"][1:] == runs["0"][1:]


def test_layer_kernels_from_several_python_threads_at_once():
    # Each Python thread that calls in leads its own team (OpenMP gives every outside thread one).
    import threading

    packed, state = quantized(1030, 1024, "nf4", 64, True)
    args = ops.quant_args(packed, state)
    xs = [torch.randn(2, 1024, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [ops.gemm_4bit_cpu(x, *args) for x in xs]
    got = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(20):
                got[i] = ops.gemm_4bit_cpu(xs[i], *args)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@settings(max_examples=25)
@given(
    m=st.integers(1, 16),
    n_out=st.integers(1, 40),
    k=st.integers(1, 200),
    quant_type=st.sampled_from(QUANT_TYPES),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    isa=st.sampled_from(TESTED),
    dtype=st.sampled_from(DTYPES),
)
def test_any_shape_on_any_level(m, n_out, k, quant_type, blocksize, double_quant, isa, dtype):
    packed, state = quantized(n_out, k, quant_type, blocksize, double_quant, seed=k)
    # Seeded from the example, so that a failure hypothesis reports can be replayed.
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 * m + k)).to(dtype)
    with on_level(isa):
        y = ops.gemm_4bit_cpu(x, *ops.quant_args(packed, state), isa=isa)
    assert_matches_reference(y, x, kernel_weight(reference_weight(packed, state), isa, dtype))


def test_empty_inputs():
    packed, state = quantized(8, 64, "nf4", 64, False)
    args = ops.quant_args(packed, state)
    assert ops.gemm_4bit_cpu(torch.empty(0, 64), *args).shape == (0, 8)
    assert torch.ops.qlora_rs.gemm_4bit(torch.empty(2, 0, 64, dtype=torch.bfloat16), *args).shape == (2, 0, 8)
    # No input features: every output is an empty sum, on both sides of the crossover.
    packed, state = qlora_rs.quantize(torch.empty(8, 0), "nf4", 64, False)
    for m in (3, ops.CPU_FUSED_GEMM_MAX_M + 1):
        y = torch.ops.qlora_rs.gemm_4bit(torch.empty(m, 0), *ops.quant_args(packed, state))
        assert torch.equal(y, torch.zeros(m, 8))


# ---------------------------------------------------------------------------------------------
# The op: fused kernel up to the crossover, decode + torch's GEMM above it


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_is_right_on_both_sides_of_the_crossover(dtype):
    packed, state = quantized(40, 192, "nf4", 64, True)
    args = ops.quant_args(packed, state)
    w = reference_weight(packed, state)
    limit = ops.CPU_FUSED_GEMM_MAX_M
    for m in (1, limit, limit + 1, 2 * limit + 3):
        x = torch.randn(m, 192).to(dtype)
        y = torch.ops.qlora_rs.gemm_4bit(x, *args)
        if m <= limit:
            assert torch.equal(y, ops.gemm_4bit_cpu(x, *args))
        if ops.matmul_dtype(dtype, x.device) == torch.float32 or dtype == torch.float32:
            assert_matches_reference(y, x, w)
        else:
            # Above the crossover the decode rounds the weight to the 16-bit compute dtype first.
            assert_matches_reference(y, x, kernel_weight(w, None, dtype) if m <= limit else w.to(dtype).float())


def _decode_then_linear(weight: ops.CpuPackedWeight, x: torch.Tensor) -> torch.Tensor:
    """The larger products as they were before the reused buffer: a new tensor per decode."""
    mm = ops.matmul_dtype(x.dtype, x.device)
    return F.linear(x.to(mm), weight.dequantize(mm)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_larger_products_decode_into_one_reused_buffer(dtype):
    ops.free_decode_buffers()
    weights = [ops.CpuPackedWeight(*ops.quant_args(*quantized(n, k, "nf4", 64, True, seed=s))) for s, (n, k) in
               enumerate(((40, 192), (24, 64), (96, 192), (40, 192)))]  # a smaller one, then a larger one
    m = ops.CPU_FUSED_GEMM_MAX_M + 5
    results = []
    for w in weights:
        x = torch.randn(m, w.shape[1]).to(dtype)
        y = w.matmul(x)
        assert torch.equal(y, _decode_then_linear(w, x))
        results.append((y, y.clone()))
    # Results untouched by the later decodes, and one buffer, of the largest weight.
    assert all(torch.equal(y, kept) for y, kept in results)
    mm = ops.matmul_dtype(dtype, torch.device("cpu"))
    buffer = ops._decode_buffers()[mm]
    assert buffer.numel() == 96 * 192
    assert ops.decode_buffer(40 * 192, mm).data_ptr() == buffer.data_ptr()
    ops.free_decode_buffers()
    assert mm not in ops._decode_buffers()


def test_a_recorded_product_keeps_its_decoded_weight():
    # Called with autograd recording, F.linear saves the decoded weight for the backward: the
    # buffer then belongs to that graph, and the next decode must not write into it.
    ops.free_decode_buffers()
    a, b = (ops.CpuPackedWeight(*ops.quant_args(*quantized(32, 64, "nf4", 64, True, seed=s))) for s in (1, 2))
    m = ops.CPU_FUSED_GEMM_MAX_M + 3
    x = torch.randn(m, 64, requires_grad=True)
    g = torch.randn(m, 32)
    y = a.decoded_matmul(x)
    b.decoded_matmul(torch.randn(m, 64).requires_grad_())  # another weight decoded in between
    b.decoded_matmul(torch.randn(m, 64))
    (y * g).sum().backward()
    mm = ops.matmul_dtype(x.dtype, x.device)
    torch.testing.assert_close(x.grad, g @ a.dequantize(mm), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradients_decode_into_the_reused_buffer(dtype):
    packed, state = quantized(48, 128, "nf4", 64, True, seed=3)
    args = ops.quant_args(packed, state)
    mm = ops.matmul_dtype(dtype, torch.device("cpu"))
    ops.free_decode_buffers()
    for _ in range(2):
        grad = torch.randn(5, 7, 48).to(dtype)
        expected = torch.matmul(grad.to(mm), torch.ops.qlora_rs.dequantize_4bit(*args, mm)).to(dtype)
        assert torch.equal(ops.grad_input_4bit(grad, *args), expected)
        address = ops._decode_buffers()[mm].data_ptr()
        assert ops.decode_buffer(48 * 128, mm).data_ptr() == address  # the same buffer each time
    # Through the op's backward as training runs it.
    x = torch.randn(3, 128).to(dtype).requires_grad_()
    g = torch.randn(3, 48).to(dtype)
    (torch.ops.qlora_rs.gemm_4bit(x, *args).float() * g.float()).sum().backward()
    assert torch.equal(x.grad, torch.matmul(g.to(mm), torch.ops.qlora_rs.dequantize_4bit(*args, mm)).to(dtype))


def test_a_recorded_input_gradient_keeps_its_decoded_weight():
    # create_graph: the backward's own product is recorded, its decoded weight saved for the
    # second derivative, which a later decode must not overwrite.
    a, b = (ops.quant_args(*quantized(32, 64, "nf4", 64, True, seed=s)) for s in (4, 5))
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 32, requires_grad=True)
    (gx,) = torch.autograd.grad(torch.ops.qlora_rs.gemm_4bit(x, *a), x, grad_outputs=g, create_graph=True)
    xb = torch.randn(6, 64, requires_grad=True)
    torch.ops.qlora_rs.gemm_4bit(xb, *b).sum().backward()  # another weight decoded in between
    u = torch.randn(6, 64)
    (gg,) = torch.autograd.grad((gx * u).sum(), g)
    w = torch.ops.qlora_rs.dequantize_4bit(*a, torch.float32)
    torch.testing.assert_close(gg, u @ w.T, rtol=1e-5, atol=1e-5)


def test_each_thread_decodes_into_its_own_buffer():
    import threading

    mm = ops.matmul_dtype(torch.float32, torch.device("cpu"))
    mine = ops.decode_buffer(100, mm)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(ops.decode_buffer(100, mm).data_ptr()))
    thread.start()
    thread.join()
    assert theirs and theirs[0] != mine.data_ptr()
    assert ops.decode_buffer(100, mm).data_ptr() == mine.data_ptr()


def test_op_gradient_wrt_x_on_the_fused_path():
    packed, state = quantized(24, 64, "int4", 32, True)
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 24)
    (torch.ops.qlora_rs.gemm_4bit(x, *ops.quant_args(packed, state)) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ reference_weight(packed, state), rtol=1e-5, atol=1e-5)


def _entries_for(t: torch.Tensor) -> int:
    return sum(entry[1]() is t for entry in list(ops._cpu_weights.values()))


def test_op_checks_each_weight_once_and_follows_changes():
    packed, state = quantized(40, 96, "nf4", 64, True)
    args = ops.quant_args(packed, state)
    x = torch.randn(2, 96)
    first = ops.cpu_weight(*args)
    y = torch.ops.qlora_rs.gemm_4bit(x, *args)
    assert ops.cpu_weight(*args) is first and _entries_for(packed) == 1  # the op used it too
    assert_matches_reference(y, x, reference_weight(packed, state))
    # Each way of changing the description builds it again, and the op follows.
    changes = [
        lambda: state.absmax.__setitem__(slice(0, 3), state.absmax[:3] // 2),  # written in place: a new version
        lambda: packed.__setitem__(slice(0, 8), 0x77),
        lambda: setattr(state, "nested_absmax", state.nested_absmax * 2),  # another tensor
        lambda: setattr(state, "offset", state.offset + 0.01),
    ]
    for change in changes:
        change()
        args = ops.quant_args(packed, state)
        rebuilt = ops.cpu_weight(*args)
        assert rebuilt is not first and ops.cpu_weight(*args) is rebuilt and _entries_for(packed) == 1
        first = rebuilt
        assert_matches_reference(torch.ops.qlora_rs.gemm_4bit(x, *args), x, reference_weight(packed, state))
        assert torch.equal(torch.ops.qlora_rs.dequantize_4bit(*args, torch.float32), reference_weight(packed, state))


def test_kept_weights_read_the_codes_where_memory_bound():
    # On the AVX-512 levels the fused products of a large kept weight read the 1-byte
    # double-quantized codes; the same scales, so the same bits as through the float32 ones.
    # Weights of at least _CODES_MIN_BYTES (8 MiB) only.
    packed, state = quantized(4096, 4096, "nf4", 64, True)
    w = ops.cpu_weight(*ops.quant_args(packed, state))
    assert (w._codes is not None) == ops._CODES_WHERE_MEMORY_BOUND == (ops.cpu_isa() in ("avx512", "avx512bf16"))
    small = ops.cpu_weight(*ops.quant_args(*quantized(40, 192, "nf4", 64, True)))
    assert small._codes is None
    for m, dtype in ((1, torch.bfloat16), (3, torch.float32), (ops.CPU_FUSED_GEMM_MAX_M, torch.bfloat16),
                     (ops._CODES_MAX_M + 1, torch.float32)):
        codes = w._codes is not None and (m <= ops._CODES_MAX_M or (dtype is torch.bfloat16 and ops._BF16_DOT))
        assert w._packed_for(m, dtype) is (w._codes if codes else w._weight)
        x = torch.randn(m, 4096, dtype=dtype)
        floats = torch.empty(m, 4096, dtype=dtype)
        qlora_rs._lib.cpu_gemm_4bit(w._weight, ops._capsule(x), ops._capsule(floats), None)
        assert torch.equal(w.matmul(x), floats) and torch.equal(w.fused_matmul(x), floats)


def test_kept_weights_go_with_their_tensors():
    # Nothing the cache keeps holds its key alive: neither op arguments nor a module's weight
    # (whose byte view, a view's _base, once did).
    gc.collect()
    before = len(ops._cpu_weights)
    packed, state = quantized(16, 64, "fp4", 32, False)
    q = layer()
    with torch.no_grad():
        torch.ops.qlora_rs.gemm_4bit(torch.randn(1, 64), *ops.quant_args(packed, state))
        q(torch.randn(1, 96))
    assert _entries_for(packed) == 1 and _entries_for(q.weight) == 1
    del packed, state, q
    gc.collect()
    assert len(ops._cpu_weights) == before


def test_inference_tensors_are_kept_only_by_a_module_that_forgets_its_writes():
    with torch.inference_mode():
        packed, state = quantized(16, 64, "nf4", 64, True)
        args = ops.quant_args(packed, state)
        assert ops.cpu_weight(*args) is not ops.cpu_weight(*args)  # no version to see writes by
        q, x = layer(), torch.randn(2, 96)
        before = q(x)
        assert q._cpu_kernel_weight() is q._cpu_kernel_weight() and _entries_for(q.weight) == 1
        q.quantize_weight_(torch.randn(40, 96))  # written in place; _put forgets what was kept
        assert _entries_for(q.weight) == 0
        after = q(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, torch.ops.qlora_rs.gemm_4bit(x.bfloat16(), *q._op_args()).float())


def test_bad_arguments_name_what_is_wrong():
    packed, state = quantized(8, 64, "nf4", 64, True)
    args = ops.quant_args(packed, state)
    with pytest.raises(InvalidArgumentError, match=r"x has shape \[2, 63\].*last dimension to be 64"):
        ops.gemm_4bit_cpu(torch.randn(2, 63), *args)
    with pytest.raises(InvalidArgumentError, match="isa|instruction-set level"):
        ops.gemm_4bit_cpu(torch.randn(2, 64), *args, isa="sse9")
    with pytest.raises(InvalidArgumentError, match="is on meta"):
        ops.gemm_4bit_cpu(torch.randn(2, 64, device="meta"), *args)
    with pytest.raises(InvalidArgumentError, match="absmax is uint8 with 5 entries.*needs uint8 with 8"):
        ops.gemm_4bit_cpu(torch.randn(2, 64), packed, state.absmax[:5], *args[2:])
    with pytest.raises(InvalidArgumentError, match=r"out is float32 \[8, 63\]"):
        ops.dequantize_4bit_cpu(*args, torch.float32, out=torch.empty(8, 63))


@pytest.mark.parametrize("isa", [isa for isa in ALL_ISAS if isa not in ISAS] or ["none-missing"])
def test_a_level_this_cpu_lacks_is_an_error(isa):
    if isa == "none-missing":
        pytest.skip("this CPU runs every level")
    packed, state = quantized(8, 64, "nf4", 64, False)
    with pytest.raises(InvalidArgumentError, match=f"cannot run the \"{isa}\" kernels"):
        ops.gemm_4bit_cpu(torch.randn(1, 64), *ops.quant_args(packed, state), isa=isa)


# ---------------------------------------------------------------------------------------------
# The decode


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_decode_is_bit_identical_on_every_level(quant_type, double_quant):
    packed, state = quantized(33, 131, quant_type, 64, double_quant)  # partial last block, odd n
    args = ops.quant_args(packed, state)
    want = reference_weight(packed, state)
    for dtype in DTYPES:
        for isa in TESTED:
            with on_level(isa):
                got = ops.dequantize_4bit_cpu(*args, dtype, isa=isa)
            assert torch.equal(got, want.to(dtype)), (isa, dtype)
    buffer = torch.full((33 * 131,), float("nan"), dtype=torch.bfloat16)
    out = ops.dequantize_4bit_cpu(*args, torch.bfloat16, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, want.to(torch.bfloat16))


def test_the_environment_caps_the_level_once_per_process():
    # The extension alone in a fresh process (no torch import: fast).
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('qlora_rs._lib', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.cpu_isa(), m.cpu_isas()[-1])"
    )
    for cap, want in (("portable", "portable"), ("AVX2", "avx2" if "avx2" in ISAS else "portable")):
        env = dict(os.environ, QLORA_RS_CPU_ISA=cap)
        out = subprocess.run([sys.executable, "-c", code, qlora_rs._lib.__file__], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.split() == [want, "portable"]
    assert ops.cpu_isa() in ISAS


def test_the_environment_decides_bf16_products_once_per_process():
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('qlora_rs._lib', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.cpu_bf16_products())"
    )
    for value, want in (("1", "True"), ("0", "False")):
        env = dict(os.environ, QLORA_RS_BF16_PRODUCTS=value)
        out = subprocess.run([sys.executable, "-c", code, qlora_rs._lib.__file__], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.split() == [want]
    env = dict(os.environ, QLORA_RS_BF16_PRODUCTS="yes")
    out = subprocess.run([sys.executable, "-c", code, qlora_rs._lib.__file__], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "QLORA_RS_BF16_PRODUCTS" in out.stderr and "expected 1 or 0" in out.stderr


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="this CPU lacks AVX512-BF16")
def test_bf16_products_follow_the_choice():
    # Each choice in a process of its own: the products of the float32 or the bf16-rounded weight.
    code = """if True:
        import sys, torch, qlora_rs
        from qlora_rs.core import ops
        sys.path.insert(0, sys.argv[1])
        from test_cpu_matmul import quantized, reference_weight
        packed, state = quantized(64, 4096, "nf4", 64, True)
        x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        y = ops.gemm_4bit_cpu(x, *ops.quant_args(packed, state), isa="avx512bf16").double()
        w = reference_weight(packed, state)
        for weight in (w, w.to(torch.bfloat16).float()):
            print(float((y - x.double() @ weight.double().T).abs().mean()))
    """
    errors = {}
    for value in ("0", "1"):
        env = dict(os.environ, QLORA_RS_BF16_PRODUCTS=value)
        out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                             text=True, check=True)
        errors[value] = [float(v) for v in out.stdout.split()[-2:]]
    # Each choice is nearer its own weight's exact products than the other's, on average over the
    # outputs (the bf16 output's rounding, common to both, dominates single outputs).
    assert errors["0"][0] < errors["0"][1] and errors["1"][1] < errors["1"][0], errors


# ---------------------------------------------------------------------------------------------
# Linear4bit: the weight checked once, kept until it changes


def layer(bias: bool = False, compute_dtype=torch.bfloat16) -> Linear4bit:
    lin = torch.nn.Linear(96, 40, bias=bias)
    return Linear4bit.from_linear(lin, "nf4", 64, True, compute_dtype=compute_dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_inference_path_equals_the_op_path(bias):
    q = layer(bias)
    for m in (1, 5, ops.CPU_FUSED_GEMM_MAX_M + 3):
        x = torch.randn(m, 96)
        with torch.no_grad():
            fast = q(x)
        slow = q(x)  # grad enabled and the bias requires grad: the autograd path
        assert fast.dtype == x.dtype and torch.equal(fast, slow.detach()), m


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_lora_inference_path_equals_the_function_path(bias, x_dtype):
    from qlora_rs.nn import LoraLinear4bit
    from qlora_rs.nn.lora import LORA_KERNEL_MAX_ROWS

    torch.manual_seed(0)
    lora = LoraLinear4bit(layer(bias), r=8, alpha=16, dropout=0.1)
    torch.nn.init.normal_(lora.lora_B.weight)  # B starts at zero: make the adapters count
    lora.eval()
    assert lora.base_layer._cpu_kernel_weight() is not None
    for m in (1, 5, ops.CPU_FUSED_GEMM_MAX_M + 3):
        x = torch.randn(2, m, 96).to(x_dtype)
        with torch.no_grad():
            fast = lora(x)
        slow = lora(x).detach()  # grad enabled and the adapters require grad: the autograd function
        assert lora(x).grad_fn is not None and fast.grad_fn is None and fast.dtype == x_dtype
        if 2 * m > LORA_KERNEL_MAX_ROWS:
            assert torch.equal(fast, slow), m  # the same ops
        else:
            # The Rust call sums in its own order: a result rounded to bf16 may land one unit off.
            assert ((fast - slow).abs() <= slow.abs() * 2.0**-7).all() and (fast != slow).float().mean() < 0.05, m
    # Training with dropout takes the function (a mask per call), even without gradients.
    lora.train()
    with torch.no_grad():
        a, b = lora(x), lora(x)
    assert not torch.equal(a, b)


def test_inference_path_follows_weight_changes():
    q = layer()
    x = torch.randn(2, 96)

    def op_path():
        return torch.ops.qlora_rs.gemm_4bit(x.bfloat16(), *q._op_args()).float()

    with torch.no_grad():
        before = q(x)
        q.quantize_weight_(torch.randn(40, 96))  # new values written into the same tensors
        after = q(x)
        assert not torch.equal(before, after) and torch.equal(after, op_path())
        q.weight.data = q.weight.data.clone()  # swapped storage: a new address
        q.weight_absmax.add_(1)  # written in place: a new version
        changed = q(x)
        assert not torch.equal(changed, after) and torch.equal(changed, op_path())


def test_state_dict_copies_and_pickles_ignore_the_cached_weight():
    q = layer()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        y = q(torch.ones(1, 96))
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # The kept weight is no part of the module: copies and pickles (which could not take it) work,
    # and each copy keeps its own.
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        with torch.no_grad():
            assert torch.equal(clone(torch.ones(1, 96)), y)
        assert _entries_for(clone.weight) == 1


def test_training_and_dispatch_modes_take_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    q = layer(bias=True)
    x = torch.randn(3, 96, requires_grad=True)
    q(x).sum().backward()  # needs the autograd graph
    assert x.grad is not None and q.bias.grad is not None
    with torch.no_grad(), Recorder() as recorder:
        q(torch.randn(3, 96))
    assert "qlora_rs.gemm_4bit.default" in recorder.calls


def test_cpu_kernels_are_not_used_for_meta_layers():
    q = Linear4bit(64, 16, bias=False, device="meta")
    assert q._cpu_kernel_weight() is None
    assert q(torch.empty(2, 64, device="meta")).shape == (2, 16)


def test_compiled_forward_traces_the_op_without_graph_breaks():
    torch._dynamo.reset()
    q = layer(bias=True)
    x = torch.randn(3, 96)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))
