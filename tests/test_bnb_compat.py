"""Bit-compatibility with bitsandbytes (the CPU backend of the installed release is the oracle)."""

import json
from pathlib import Path

import numpy as np
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
    """bitsandbytes' offset is `torch.mean` in float32. The Python path takes it from torch; the
    Rust-only path (convert without torch) sums in torch's order (8 SIMD lanes on every x86 CPU,
    cascade levels, one chunk per intra-op thread): both equal this process's torch.mean."""
    torch.manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in [1, 5, 8, 100, 4095, 32767, 32768, 70001, 262144, 300001]:
            absmax = torch.rand(n) * 3
            _, state = qlora_rs.quantize(absmax.repeat_interleave(32).view(n, 32) * torch.where(torch.arange(32) == 0, 1.0, 0.25), "nf4", 32)
            assert state.offset == absmax.mean().item(), f"n={n}"
            assert rust_offset(absmax, threads) == absmax.mean().item(), f"n={n}"
    finally:
        torch.set_num_threads(old)


def rust_offset(absmax, threads):
    """The offset the Rust core computes on its own (no offset passed), with `threads` threads."""
    from qlora_rs import _lib

    blocks = absmax.numel()
    q, nested = torch.empty(blocks, dtype=torch.uint8), torch.empty(-(-blocks // 256))
    return _lib.double_quantize(absmax, q, nested, None, threads)


def fixture_values(n, seed):
    """tests/data/torch_mean_f32.json's inputs: (splitmix64(seed + i) >> 40) / 2**24 * 8 + 0.25."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return torch.from_numpy(((z >> np.uint64(40)).astype(np.float64) / 2**24 * 8 + 0.25).astype(np.float32))


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_rust_offset_equals_measured_torch_mean(capability):
    """The Rust-only offset against torch.mean bit patterns measured on an AVX-512 CPU with each
    capability (the fixture; every 7th case here, the Rust tests check all of them)."""
    data = json.loads((Path(__file__).parent / "data" / "torch_mean_f32.json").read_text())
    for threads, cases in data["results"][capability].items():
        for n, seed, bits in cases[::7]:
            got = np.float32(rust_offset(fixture_values(n, seed), int(threads))).view(np.uint32)
            assert got == bits, f"{capability}, {threads} threads, n={n}, seed={seed}"


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


def _capabilities():
    """avx2 and, where it differs, this machine's default torch CPU capability."""
    default = torch.backends.cpu.get_cpu_capability()
    return ["AVX2"] + ([default] if default != "AVX2" else [])


@pytest.mark.parametrize("capability", _capabilities())
def test_whole_matrix_equals_bitsandbytes_in_each_cpu_capability(capability):
    """NF4/FP4 x every block size x double quant on/off x float32/float16/bfloat16 x odd sizes, byte
    for byte, in a fresh process per torch CPU capability: a CPU-dependent path in torch, bitsandbytes
    or the core shows up on any machine with AVX-512."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "_bnb_matrix.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["capability"] != capability:
        pytest.skip(f"torch runs {result['capability']} here when asked for {capability}")
    assert result["cases"] > 190
    assert result["mismatches"] == []
