"""Bit-compatibility with bitsandbytes (the CPU backend of the installed release is the oracle)."""

import json

import pytest
import torch

import qlora_rs

F = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sizes(blocksize):
    """An even multiple of the block size with more than 256 blocks (several nested blocks),
    plus an odd size with a partial last block."""
    return [blocksize * 300, blocksize * 3 + 17]


def bnb_quantize(x, quant_type, blocksize, double_quant):
    return F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


CASES = [
    (qt, bs, dq, DTYPES[(i + j) % 3])
    for i, qt in enumerate(["nf4", "fp4"])
    for j, bs in enumerate(BLOCKSIZES)
    for dq in (False, True)
]


@pytest.mark.parametrize("quant_type,blocksize,double_quant,dtype", CASES)
def test_encoding_equals_bitsandbytes(quant_type, blocksize, double_quant, dtype):
    torch.manual_seed(blocksize + double_quant)
    for n in sizes(blocksize):
        x = torch.randn(n, dtype=torch.float32).to(dtype)
        packed, state = qlora_rs.quantize(x, quant_type, blocksize, double_quant)
        bpacked, bstate = bnb_quantize(x, quant_type, blocksize, double_quant)
        assert torch.equal(packed, bpacked), f"packed codes differ for n={n}"
        assert torch.equal(state.code, bstate.code)
        if not double_quant:
            assert torch.equal(state.absmax, bstate.absmax)
            continue
        assert state.offset == bstate.offset.item()
        assert torch.equal(state.absmax, bstate.absmax), f"nested codes differ for n={n}"
        assert torch.equal(state.nested_absmax, bstate.state2.absmax)
        assert torch.equal(state.nested_code, bstate.state2.code)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_double_quant_offset_equals_torch_mean(threads):
    """bitsandbytes' offset is `torch.mean` in float32; the core sums in torch's order (SIMD lanes,
    cascade levels, one chunk per intra-op thread), so the offsets are identical."""
    torch.manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in [1, 5, 8, 100, 4095, 32767, 32768, 70001, 262144, 300001]:
            absmax = torch.rand(n) * 3
            _, state = qlora_rs.quantize(absmax.repeat_interleave(32).view(n, 32) * torch.where(torch.arange(32) == 0, 1.0, 0.25), "nf4", 32)
            assert state.offset == absmax.mean().item(), f"n={n}"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 320), (33, 65), (4096 * 3 + 1,)])
def test_decoding_bitsandbytes_tensors(quant_type, double_quant, out_dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(shape).to(out_dtype)
    for blocksize in (64, 2048):
        bpacked, bstate = bnb_quantize(w, quant_type, blocksize, double_quant)
        want = F.dequantize_4bit(bpacked, bstate).reshape(shape)
        state = qlora_rs.QuantState.from_dict(bstate.as_dict(packed=True))
        got = qlora_rs.dequantize(bpacked, state)
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_as_dict_equals_bitsandbytes(quant_type, double_quant):
    torch.manual_seed(3)
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    _, state = qlora_rs.quantize(w, quant_type, 64, double_quant)
    _, bstate = bnb_quantize(w, quant_type, 64, double_quant)
    ours, theirs = state.as_dict(packed=True), bstate.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    key = f"quant_state.bitsandbytes__{quant_type}"
    for k in theirs:  # byte for byte (torch.equal would let -0.0 pass for +0.0)
        assert torch.equal(ours[k].contiguous().view(torch.uint8), theirs[k].contiguous().view(torch.uint8)), k
    meta = json.loads(bytes(ours[key].tolist()))
    assert list(meta) == list(json.loads(bytes(theirs[key].tolist())))
    assert meta["shape"] == [64, 96] and meta["dtype"] == "bfloat16"
    # And bitsandbytes reads our state back.
    back = F.QuantState.from_dict(ours, device=torch.device("cpu"))
    assert back.blocksize == 64 and back.quant_type == quant_type and back.nested == double_quant


def test_bitsandbytes_decodes_our_tensors():
    torch.manual_seed(4)
    w = torch.randn(128, 200, dtype=torch.bfloat16)
    packed, state = qlora_rs.quantize(w, "nf4", 64, True)
    bstate = F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(packed, bstate).reshape(w.shape), qlora_rs.dequantize(packed, state))
