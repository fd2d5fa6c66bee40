"""Byte-for-byte compatibility of the 8-bit blockwise quantizer (and so of double-quantized
4-bit block scales) with bitsandbytes' CPU `quantize_blockwise`, the installed release as oracle.

bitsandbytes (0.50) does not pick the nearest map entry: it snaps each normalised value to a
65536-point grid over [-1, 1] and reads a precomputed code (see `Encoder8` in rust/codebook.rs).
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlora_rs

F = pytest.importorskip("bitsandbytes.functional")

SIGNED = F.create_dynamic_map(True)


def bnb_blockwise(x, code=None, blocksize=256):
    q, state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    return q, state.absmax


def sample(kind, n, scale, gen):
    if kind == "normal":
        x = torch.randn(n, generator=gen)
    elif kind == "uniform":
        x = torch.rand(n, generator=gen) * 2 - 1
    elif kind == "heavy":  # Cauchy-like: a few huge values per block, the rest near zero
        x = torch.randn(n, generator=gen) / torch.randn(n, generator=gen).abs().clamp_min(1e-3)
    elif kind == "centered":  # what double quantization feeds in: absmax minus its mean
        a = torch.randn(n, generator=gen).abs()
        x = a - a.mean()
    else:  # "ties": values on a coarse lattice, so many repeats and exact zeros
        x = torch.randint(-8, 9, (n,), generator=gen).float() / 8
    return x * scale


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    kind=st.sampled_from(["normal", "uniform", "heavy", "centered", "ties"]),
    scale=st.sampled_from([1.0, 3.7e-3, 1e-30, 1e30, 2e-39]),
    blocksize=st.sampled_from([64, 256, 1000]),
)
def test_codes_and_absmax_equal_bitsandbytes(seed, n, kind, scale, blocksize):
    x = sample(kind, n, scale, torch.Generator().manual_seed(seed))
    q, absmax = qlora_rs.quantize_blockwise_8bit(x, blocksize=blocksize)
    bq, babsmax = bnb_blockwise(x, blocksize=blocksize)
    assert torch.equal(absmax, babsmax)
    assert torch.equal(q, bq)


@pytest.mark.parametrize("kind", ["normal", "uniform", "heavy", "centered"])
def test_many_values_equal_bitsandbytes(kind):
    """Large enough that the exact nearest-entry search differed in ~0.3% of the codes."""
    x = sample(kind, 256 * 1200 + 77, 1.0, torch.Generator().manual_seed(7))
    q, absmax = qlora_rs.quantize_blockwise_8bit(x)
    bq, babsmax = bnb_blockwise(x)
    assert torch.equal(absmax, babsmax)
    assert torch.equal(q, bq)


def test_unsigned_map_equals_bitsandbytes():
    code = F.create_dynamic_map(False)
    x = torch.rand(256 * 40 + 3, generator=torch.Generator().manual_seed(3)) ** 3
    q, absmax = qlora_rs.quantize_blockwise_8bit(x, code=code)
    bq, babsmax = bnb_blockwise(x, code=code)
    assert torch.equal(absmax, babsmax) and torch.equal(q, bq)


def test_grid_rule_is_not_nearest():
    """0.0 (and values up to half a grid step, 1.5e-5, above it) encodes as 131, not 127 (= 0.0)."""
    x = torch.tensor([1.0, 0.0, -0.0, 1e-7, -1e-6, -1.0, float(SIGNED[0]), 0.9999])
    q, _ = qlora_rs.quantize_blockwise_8bit(x)
    assert q.tolist() == [255, 131, 131, 131, 123, 0, 0, 255]
    assert torch.equal(q, bnb_blockwise(x)[0])


def test_subnormal_absmax_equals_bitsandbytes():
    """1/absmax overflows to inf: nonzero values clamp to +-1 and zeros (0 * inf = NaN) get 0."""
    x = torch.tensor([2e-39, 0.0, -1e-39, 5e-40] + [3.0] * 4)
    q, absmax = qlora_rs.quantize_blockwise_8bit(x, blocksize=4)
    bq, babsmax = bnb_blockwise(x, blocksize=4)
    assert torch.equal(absmax, babsmax) and torch.equal(q, bq)
    assert q[:4].tolist() == [255, 0, 0, 255]


def test_all_zero_block():
    """An all-zero block stores code 0 with absmax 0, as bitsandbytes does; it decodes to zero
    (no NaN), and the other blocks are unaffected."""
    x = torch.cat([torch.zeros(256), torch.randn(300, generator=torch.Generator().manual_seed(0))])
    q, absmax = qlora_rs.quantize_blockwise_8bit(x)
    bq, babsmax = bnb_blockwise(x)
    assert torch.equal(absmax, babsmax) and absmax[0] == 0
    assert torch.equal(q, bq) and (q[:256] == 0).all()
    back = qlora_rs.dequantize_blockwise_8bit(q, absmax)
    assert (back[:256] == 0).all()


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_double_quant_equals_bitsandbytes(blocksize):
    """Offset, nested codes and nested absmax of 4-bit double quantization."""
    gen = torch.Generator().manual_seed(blocksize)
    for n, kind in [(blocksize * 700 + 5, "normal"), (blocksize * 300, "heavy"), (blocksize * 3 + 1, "uniform")]:
        x = sample(kind, n, 0.02, gen)
        _, state = qlora_rs.quantize(x, "nf4", blocksize, True)
        _, bstate = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert state.offset == bstate.offset.item()
        assert torch.equal(state.absmax, bstate.absmax), f"nested codes differ for n={n}"
        assert torch.equal(state.nested_absmax, bstate.state2.absmax)


def test_numpy_reference_of_the_grid_rule():
    """A small numpy statement of the rule (for readers), checked against bitsandbytes."""
    code = SIGNED.numpy()
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    grid = np.float32(2) * np.arange(65536, dtype=np.float32) / np.float32(65535) - np.float32(1)
    lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)  # number of midpoints < grid
    x = torch.randn(256 * 50, generator=torch.Generator().manual_seed(5))
    _, absmax = qlora_rs.quantize_blockwise_8bit(x)
    inv = (np.float32(1) / absmax.numpy()).repeat(256)
    t = (np.clip(x.numpy() * inv, -1, 1) + np.float32(1)) * np.float32(0.5)
    k = (t.astype(np.float64) * 65535 + 0.5).astype(np.float32).astype(np.int64)  # fused multiply-add
    assert np.array_equal(lut[k], bnb_blockwise(x)[0].numpy())
