"""The 4-bit core through the Python API: properties against the pure-torch reference, edge
cases and error messages."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlora_rs
from qlora_rs import InvalidArgumentError, NonFiniteError, QloraError

import _reference as ref

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4", "int4"]


@st.composite
def tensors(draw):
    n = draw(st.integers(min_value=1, max_value=3000))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-6, 0.02, 1.0, 300.0]))
    x = torch.randn(n, generator=g) * scale
    if draw(st.booleans()):  # exact zeros and repeated values exercise ties and zero blocks
        x[torch.rand(n, generator=g) < 0.3] = 0.0
    return x.to(dtype)


@given(tensors(), st.sampled_from(QUANT_TYPES), st.sampled_from(BLOCKSIZES[:5]))
def test_quantize_matches_reference(x, quant_type, blocksize):
    packed, state = qlora_rs.quantize(x, quant_type, blocksize, double_quant=False)
    want_packed, want_absmax = ref.quantize(x, quant_type, blocksize)
    assert torch.equal(packed, want_packed)
    assert torch.equal(state.absmax, want_absmax)


@given(tensors(), st.sampled_from(QUANT_TYPES), st.sampled_from(BLOCKSIZES[:5]), st.sampled_from(DTYPES))
def test_dequantize_matches_reference(x, quant_type, blocksize, out_dtype):
    packed, state = qlora_rs.quantize(x, quant_type, blocksize, double_quant=False)
    got = qlora_rs.dequantize(packed, state, out_dtype)
    want = ref.dequantize(packed, state.absmax, quant_type, blocksize, x.numel(), out_dtype)
    assert got.dtype == out_dtype and got.shape == x.shape
    assert torch.equal(got.view(-1), want)


@given(tensors(), st.sampled_from(QUANT_TYPES), st.sampled_from(BLOCKSIZES))
def test_double_quant_error_is_small(x, quant_type, blocksize):
    """Double quantization perturbs each block scale by at most ~1% of the largest scale."""
    _, plain = qlora_rs.quantize(x, quant_type, blocksize, double_quant=False)
    _, dq = qlora_rs.quantize(x, quant_type, blocksize, double_quant=True)
    decoded = qlora_rs.functional.absmax_float(dq)
    assert torch.isfinite(decoded).all()
    tol = 0.02 * plain.absmax.abs().max() + 1e-30
    assert (decoded - plain.absmax).abs().max() <= tol


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_shape_dtype_and_error(quant_type, dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 96).to(dtype)
    packed, state = qlora_rs.quantize(w, quant_type)
    assert packed.shape == (48 * 96 // 2, 1) and packed.dtype == torch.uint8
    assert state.shape == w.shape and state.dtype == dtype and state.nested
    out = qlora_rs.dequantize(packed, state)
    assert out.shape == w.shape and out.dtype == dtype
    rel = (out.float() - w.float()).norm() / w.float().norm()
    assert rel < 0.2


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    """The QLoRA paper's ablation in miniature: NF4 has the lowest error on normal data."""
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    err = {}
    for qt in QUANT_TYPES:
        p, s = qlora_rs.quantize(w, qt, 64, double_quant=False)
        err[qt] = (qlora_rs.dequantize(p, s) - w).pow(2).mean().item()
    assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"]


def test_all_zero_blocks_encode_as_zero_without_nan():
    x = torch.zeros(64 * 3 + 10)
    x[64:128] = torch.randn(64)
    packed, state = qlora_rs.quantize(x, "nf4", 64, double_quant=False)
    assert (packed[:32] == 0x77).all()  # 0x7 is the nibble of 0.0 in NF4
    assert state.absmax[0] == 0.0  # a full all-zero block stores 0 ...
    assert state.absmax[-1] == pytest.approx(1e-38, rel=1e-6)  # ... a partial one the clamp
    for dq in (False, True):
        p, s = qlora_rs.quantize(x, "nf4", 64, double_quant=dq)
        out = qlora_rs.dequantize(p, s)
        assert torch.isfinite(out).all()
        assert (out[:64] == 0).all() and (out[-10:] == 0).all()


def test_all_zero_tensor_with_double_quant():
    p, s = qlora_rs.quantize(torch.zeros(4096), "nf4", 64, double_quant=True)
    assert torch.isfinite(qlora_rs.functional.absmax_float(s)).all()
    assert (qlora_rs.dequantize(p, s) == 0).all()


@pytest.mark.parametrize("n", [1, 3, 63, 65, 127, 1001])
def test_odd_and_partial_sizes(n):
    x = torch.randn(n)
    packed, state = qlora_rs.quantize(x, "nf4", 64)
    assert packed.numel() == (n + 1) // 2
    assert state.absmax.numel() == -(-n // 64)
    if n % 2:
        assert packed[-1, 0] & 0x0F == 0x7  # the pad nibble encodes 0.0
    assert qlora_rs.dequantize(packed, state).shape == (n,)


def test_empty_input():
    packed, state = qlora_rs.quantize(torch.empty(0, 16), "nf4", 64)
    assert packed.shape == (0, 1) and state.absmax.numel() == 0
    assert qlora_rs.dequantize(packed, state).shape == (0, 16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_names_first_position(bad):
    x = torch.randn(4, 100)
    x[2, 17] = bad
    x[3, 5] = bad
    with pytest.raises(NonFiniteError, match=r"flat index 217\b") as e:
        qlora_rs.quantize(x)
    assert "allow_nonfinite" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, QloraError)


def test_allow_nonfinite_saturates_and_zeroes():
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf")] + [0.5] * 60)
    packed, state = qlora_rs.quantize(x, "nf4", 64, double_quant=False, allow_nonfinite=True)
    out = qlora_rs.dequantize(packed, state)
    assert torch.isfinite(out).all()
    assert out[1] == 0.0 and out[3] == pytest.approx(2.0) and out[2] == pytest.approx(-2.0)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_unsupported_blocksize_lists_supported(blocksize):
    with pytest.raises(InvalidArgumentError, match=r"32, 64, 128, 256, 512, 1024, 2048, 4096"):
        qlora_rs.quantize(torch.randn(128), "nf4", blocksize)


def test_unsupported_quant_type_and_dtype():
    with pytest.raises(InvalidArgumentError, match=r"'nf3'.*nf4, fp4, int4"):
        qlora_rs.quantize(torch.randn(64), "nf3")
    with pytest.raises(InvalidArgumentError, match=r"float64 is not supported: expected one of float32, float16, bfloat16"):
        qlora_rs.quantize(torch.randn(64, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match=r"int32"):
        qlora_rs.quantize(torch.arange(64, dtype=torch.int32))
    with pytest.raises(InvalidArgumentError, match=r"numpy dtype float64"):
        qlora_rs.quantize(np.zeros(64))


def test_non_contiguous_input_is_handled():
    w = torch.randn(96, 64)
    t = w.t()  # a transposed view
    assert not t.is_contiguous()
    p1, s1 = qlora_rs.quantize(t)
    p2, s2 = qlora_rs.quantize(t.contiguous())
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)


def test_numpy_and_bfloat16_inputs():
    a = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    p_np, s_np = qlora_rs.quantize(a)
    p_t, s_t = qlora_rs.quantize(torch.from_numpy(a))
    assert torch.equal(p_np, p_t)
    p16, _ = qlora_rs.quantize(a.astype(np.float16))
    assert p16.shape == p_np.shape
    bf = torch.from_numpy(a).to(torch.bfloat16)
    p_bf, s_bf = qlora_rs.quantize(bf)
    assert s_bf.dtype == torch.bfloat16
    assert qlora_rs.dequantize(p_bf, s_bf).dtype == torch.bfloat16


def test_dequantize_rejects_wrong_packed_size():
    p, s = qlora_rs.quantize(torch.randn(128))
    with pytest.raises(InvalidArgumentError, match=r"packed has 63 bytes but shape \[128\] needs 64"):
        qlora_rs.dequantize(p[:63], s)


def test_quant_state_dict_round_trip():
    p, s = qlora_rs.quantize(torch.randn(70, 33).to(torch.bfloat16), "fp4", 128)
    d = s.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__fp4"}
    s2 = qlora_rs.QuantState.from_dict({"weight." + k: v for k, v in d.items()})
    assert torch.equal(qlora_rs.dequantize(p, s2), qlora_rs.dequantize(p, s))
    assert s2.shape == s.shape and s2.dtype == s.dtype and s2.offset == s.offset


def test_quant_state_from_dict_errors():
    _, s = qlora_rs.quantize(torch.randn(256), "nf4", 64)
    d = s.as_dict(packed=True)
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(qlora_rs.FormatError, match="not UTF-8 JSON"):
        qlora_rs.QuantState.from_dict(bad)
    bad = dict(d)
    bad["absmax"] = d["absmax"][:-1]
    with pytest.raises(qlora_rs.FormatError, match=r"absmax is uint8 with 3 entries; 'shape' \[256\] in blocks of 'blocksize' 64 needs uint8 with 4"):
        qlora_rs.QuantState.from_dict(bad)
    with pytest.raises(qlora_rs.FormatError, match="exactly one packed"):
        qlora_rs.QuantState.from_dict({"absmax": d["absmax"]})


def test_blockwise_8bit_round_trip():
    torch.manual_seed(0)
    x = torch.randn(1000)
    q, absmax = qlora_rs.quantize_blockwise_8bit(x)
    assert q.dtype == torch.uint8 and absmax.shape == (4,)
    back = qlora_rs.dequantize_blockwise_8bit(q, absmax)
    assert (back - x).abs().max() < 0.02 * x.abs().max()


def test_build_info():
    info = qlora_rs.build_info()
    assert info["version"] == qlora_rs.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert info["threads"] >= 1


def test_error_tree():
    assert issubclass(qlora_rs.InvalidArgumentError, ValueError)
    assert issubclass(qlora_rs.FormatError, ValueError)
    assert issubclass(qlora_rs.CudaError, RuntimeError)
    for cls in (qlora_rs.InvalidArgumentError, qlora_rs.NonFiniteError, qlora_rs.FormatError,
                qlora_rs.CudaError, qlora_rs.CudaUnavailableError, qlora_rs.OutOfMemoryError):
        assert issubclass(cls, QloraError)
