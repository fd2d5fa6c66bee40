"""The CPU bindings of ``qlora_rs._lib`` take tensors (or DLPack capsules), not addresses: every
wrong argument is an InvalidArgumentError naming it, before Rust touches a byte."""

import gc

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

from qlora_rs import _lib
from qlora_rs.core import functional, ops
from qlora_rs.errors import InvalidArgumentError


def _quant_outputs(n, blocksize=64):
    return torch.empty((n + 1) // 2, dtype=torch.uint8), torch.empty(-(-n // blocksize), dtype=torch.float32)


def test_tensors_and_capsules_give_the_same_result():
    x = torch.randn(1000)
    p1, a1 = _quant_outputs(1000)
    p2, a2 = _quant_outputs(1000)
    _lib.quantize_4bit(x, "nf4", 64, False, p1, a1)
    _lib.quantize_4bit(to_dlpack(x), "nf4", 64, False, to_dlpack(p2), to_dlpack(a2))
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    p3, a3 = _quant_outputs(1000)
    _lib.quantize_4bit(x.numpy(), "nf4", 64, False, p3.numpy(), a3.numpy())  # numpy through __dlpack__
    assert torch.equal(p1, p3)


def test_wrong_dtype_names_the_argument():
    p, a = _quant_outputs(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: absmax: dtype float16, expected float32"):
        _lib.quantize_4bit(torch.randn(256), "nf4", 64, False, p, a.half())
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: dtype int32, expected float32, float16 or bfloat16"):
        _lib.quantize_4bit(torch.zeros(256, dtype=torch.int32), "nf4", 64, False, p, a)


def test_wrong_length_names_the_argument():
    p, a = _quant_outputs(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: packed: 127 elements, expected 128"):
        _lib.quantize_4bit(torch.randn(256), "nf4", 64, False, p[:127], a)
    out = torch.empty(250)
    with pytest.raises(InvalidArgumentError, match=r"dequantize_4bit: packed: 128 elements, expected 125"):
        _lib.dequantize_4bit(p, torch.ones(4), "nf4", 64, out)
    with pytest.raises(InvalidArgumentError, match=r"double_dequantize: out: 3 elements, expected 4"):
        _lib.double_dequantize(torch.zeros(4, dtype=torch.uint8), torch.ones(1), 0.0, [0.0] * 256, torch.empty(3))


def test_non_contiguous_is_refused():
    p, a = _quant_outputs(256)
    x = torch.randn(16, 16).t()
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: the tensor is not contiguous.*\.contiguous\(\)"):
        _lib.quantize_4bit(x, "nf4", 64, False, p, a)
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        _lib.quantize_4bit(torch.randn(512)[::2], "nf4", 64, False, p, a)


def test_size_one_dimensions_with_any_stride_are_contiguous():
    x = torch.randn(256, 1).t()  # shape [1, 256], strides (1, 1)
    p, a = _quant_outputs(256)
    _lib.quantize_4bit(x, "nf4", 64, False, p, a)


def test_meta_tensor_is_refused():
    p, a = _quant_outputs(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: the tensor cannot be exported through DLPack"):
        _lib.quantize_4bit(torch.empty(256, device="meta"), "nf4", 64, False, p, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_refused():
    p, a = _quant_outputs(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: the tensor is on cuda, expected a CPU tensor"):
        _lib.quantize_4bit(to_dlpack(torch.randn(256, device="cuda")), "nf4", 64, False, p, a)


def test_output_overlapping_an_input_is_refused():
    buf = torch.zeros(300)
    with pytest.raises(InvalidArgumentError, match=r"double_dequantize: out shares memory with double_dequantize: nested"):
        _lib.double_dequantize(torch.zeros(256, dtype=torch.uint8), buf[:1], 0.0, [0.0] * 256, buf[:256])
    q = torch.zeros(512, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match="shares memory"):
        _lib.double_quantize(torch.ones(64), q[:64], q.view(torch.float32)[15:16], 1.0)  # bytes 60..64 of q
    x = torch.randn(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_blockwise_8bit: absmax shares memory with .*input"):
        _lib.quantize_blockwise_8bit(x, _lib.dynamic_map(True), 256, torch.empty(256, dtype=torch.uint8), x[:1])


def test_requires_grad_tensor_is_a_clear_error():
    p, a = _quant_outputs(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: the tensor cannot be exported.*detach"):
        _lib.quantize_4bit(torch.randn(256, requires_grad=True), "nf4", 64, False, p, a)


def test_addresses_and_other_objects_are_refused():
    p, a = _quant_outputs(256)
    x = torch.randn(256)
    with pytest.raises(InvalidArgumentError, match=r"quantize_4bit: input: expected a CPU tensor \(or a DLPack capsule\), got int"):
        _lib.quantize_4bit(x.data_ptr(), "nf4", 64, False, p, a)


def test_a_capsule_is_consumed_once():
    p, a = _quant_outputs(256)
    cap = to_dlpack(torch.randn(256))
    _lib.quantize_4bit(cap, "nf4", 64, False, p, a)
    with pytest.raises(InvalidArgumentError, match="not an unconsumed DLPack tensor"):
        _lib.quantize_4bit(cap, "nf4", 64, False, p, a)


def _weight(n=64, k=128):
    w = torch.randn(n, k)
    packed, state = functional.quantize(w, quant_type="nf4", blocksize=64, double_quant=True)
    return packed, state, functional.dequantize(packed, state, torch.float32)


def test_packed_weight_checks_its_tensors():
    packed, state, _ = _weight()
    args = (state.absmax, state.nested_absmax, state.nested_code, state.offset, "nf4", 64)
    with pytest.raises(InvalidArgumentError, match=r"PackedWeight4: packed: 4096 elements, expected 4128"):
        _lib.PackedWeight4(packed, *args, 64, 129)
    with pytest.raises(InvalidArgumentError, match=r"PackedWeight4: absmax: dtype float32, expected uint8"):
        _lib.PackedWeight4(packed, state.absmax.float(), *args[1:], 64, 128)
    with pytest.raises(InvalidArgumentError, match=r"PackedWeight4: nested_code: 255 elements, expected 256"):
        _lib.PackedWeight4(packed, state.absmax, state.nested_absmax, state.nested_code[:255], *args[3:], 64, 128)


def test_gemm_checks_activations_and_output():
    packed, state, _ = _weight()
    w = ops.CpuPackedWeight(*ops.quant_args(packed, state))._weight
    x = torch.randn(2, 128)
    with pytest.raises(InvalidArgumentError, match=r"cpu_gemm_4bit: x has 127 elements, not a multiple of in_features 128"):
        _lib.cpu_gemm_4bit(w, x.flatten()[:127], torch.empty(2, 64))
    with pytest.raises(InvalidArgumentError, match=r"cpu_gemm_4bit: out has 64 elements, expected 2 x 64 = 128"):
        _lib.cpu_gemm_4bit(w, x, torch.empty(1, 64))
    with pytest.raises(InvalidArgumentError, match=r"cpu_gemm_4bit: out is bfloat16, expected x's dtype float32"):
        _lib.cpu_gemm_4bit(w, x, torch.empty(2, 64, dtype=torch.bfloat16))
    buf = torch.randn(256)
    with pytest.raises(InvalidArgumentError, match=r"cpu_gemm_4bit: out shares memory with cpu_gemm_4bit: x"):
        _lib.cpu_gemm_4bit(w, buf[:128], buf[64:128])
    with pytest.raises(InvalidArgumentError, match=r"cpu_dequantize_4bit: out: 100 elements, expected 8192"):
        _lib.cpu_dequantize_4bit(w, torch.empty(100))


def test_gemm_refuses_writing_into_the_weight():
    packed, state, _ = _weight()
    # A float32 "storage" view of the packed bytes as the output: it would overwrite the weight.
    w = _lib.PackedWeight4(packed, state.absmax, state.nested_absmax, state.nested_code, state.offset, "nf4", 64, 64, 128)
    with pytest.raises(InvalidArgumentError, match=r"out shares memory with PackedWeight4: packed"):
        _lib.cpu_gemm_4bit(w, torch.randn(1, 128), packed.view(-1)[:256].view(torch.float32))


def test_packed_weight_keeps_its_memory_alive():
    packed, state, ref = _weight()
    w = _lib.PackedWeight4(
        to_dlpack(packed.clone()), to_dlpack(state.absmax.clone()), to_dlpack(state.nested_absmax.clone()),
        to_dlpack(state.nested_code.clone()), state.offset, "nf4", 64, 64, 128,
    )
    gc.collect()
    torch.randn(1 << 20)  # reuse freed memory, if any were freed
    x = torch.randn(3, 128)
    out = torch.empty(3, 64)
    _lib.cpu_gemm_4bit(w, x, out)
    torch.testing.assert_close(out, x @ ref.T, rtol=1e-4, atol=1e-4)


def test_empty_tensors_are_fine():
    _lib.quantize_4bit(torch.empty(0), "nf4", 64, False, torch.empty(0, dtype=torch.uint8), torch.empty(0))
    _lib.dequantize_blockwise_8bit(
        np.empty(0, np.uint8), np.empty(0, np.float32), _lib.dynamic_map(True), 256, np.empty(0, np.float32)
    )


def test_misaligned_input_is_read_and_misaligned_output_refused():
    # A float32 tensor at an odd byte offset, as torch.frombuffer gives for a file read at such an offset.
    raw = torch.zeros(4 * 256 + 1, dtype=torch.uint8)
    x = torch.randn(256)
    raw[1:].copy_(x.view(torch.uint8))
    odd = torch.frombuffer(raw.numpy(), dtype=torch.float32, offset=1, count=256)
    assert odd.data_ptr() % 4 != 0 and torch.equal(odd, x)
    p1, a1 = _quant_outputs(256)
    p2, a2 = _quant_outputs(256)
    _lib.quantize_4bit(x, "nf4", 64, False, p1, a1)
    _lib.quantize_4bit(odd, "nf4", 64, False, p2, a2)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    with pytest.raises(InvalidArgumentError, match=r"dequantize_4bit: out: the data is not aligned to its 4-byte elements"):
        _lib.dequantize_4bit(p1, a1, "nf4", 64, odd)
