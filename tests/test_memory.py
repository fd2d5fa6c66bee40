"""Memory the CPU ops reuse (qlora_rs.core.memory): dequantized outputs on blocks of a pool that
return when torch frees the tensor, the idle budget, and blocks returned at awkward moments."""

from __future__ import annotations

import threading

import pytest
import torch

import qlora_rs
from qlora_rs.core import memory, ops

BLOCK = 2 << 20  # the pool's size unit (a huge page)


@pytest.fixture
def pool(monkeypatch):
    """The pool from 64 KiB outputs up, empty at the start and at the end."""
    monkeypatch.setattr(memory, "POOL_MIN_BYTES", 1 << 16)
    memory.free_decode_buffers()
    yield memory
    memory.free_decode_buffers()


def weight_args(n: int = 256, k: int = 512, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    return ops.quant_args(*qlora_rs.quantize(torch.randn(n, k, dtype=torch.bfloat16), "nf4", 64, double_quant=True))


def decoded_elsewhere(args: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The same decode into an ordinary tensor."""
    out = torch.empty(tuple(args[-1]), dtype=dtype)
    return ops.CpuPackedWeight(*args).dequantize(dtype, out=out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_reuses_the_block_of_a_freed_output(pool, dtype):
    args = weight_args()
    expected = decoded_elsewhere(args, dtype)
    first = torch.ops.qlora_rs.dequantize_4bit(*args, dtype)
    assert torch.equal(first, expected) and first.shape == (256, 512)
    assert not first.untyped_storage().resizable()  # a pool block, not torch's allocation
    address = first.data_ptr()
    second = torch.ops.qlora_rs.dequantize_4bit(*args, dtype)
    assert second.data_ptr() != address  # the first is alive
    del first
    third = torch.ops.qlora_rs.dequantize_4bit(*args, dtype)
    assert third.data_ptr() == address and torch.equal(third, expected)
    assert torch.equal(second, expected)


def test_a_view_keeps_its_block(pool):
    args = weight_args()
    view = torch.ops.qlora_rs.dequantize_4bit(*args, torch.float32)[10:20]
    kept = view.clone()
    address = view.data_ptr()
    other = torch.ops.qlora_rs.dequantize_4bit(*args, torch.float32)
    other.fill_(0.0)
    assert torch.equal(view, kept)  # not handed out again while the view lives
    blocks = {address - 10 * 512 * 4, other.data_ptr()}
    del other, view
    assert pool.pool_idle_bytes() == 2 * BLOCK
    assert torch.ops.qlora_rs.dequantize_4bit(*args, torch.float32).data_ptr() in blocks


def test_outputs_below_the_threshold_are_ordinary_tensors():
    args = weight_args(64, 128)
    out = torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16)
    assert out.untyped_storage().resizable()
    assert torch.equal(out, decoded_elsewhere(args, torch.bfloat16))


def test_idle_blocks_beyond_the_budget_go_least_recently_used_first(pool, monkeypatch):
    monkeypatch.setattr(memory, "POOL_IDLE_BYTES", 6 * BLOCK)
    lent = {pages: pool.new_output((pages * BLOCK,), torch.uint8)[0] for pages in (1, 2, 3, 4)}
    addresses = {pages: t.data_ptr() for pages, t in lent.items()}
    for pages in (1, 3, 2):
        del lent[pages]
    assert pool.pool_idle_bytes() == 6 * BLOCK
    del lent[4]  # 10 pages idle: the least recently returned (1, then 3) go
    assert pool.pool_idle_bytes() == 6 * BLOCK
    assert pool.new_output((2 * BLOCK,), torch.uint8)[0].data_ptr() == addresses[2]
    assert pool.new_output((4 * BLOCK,), torch.uint8)[0].data_ptr() == addresses[4]
    # A block larger than the budget is still kept while it is the only idle one.
    big = pool.new_output((8 * BLOCK,), torch.uint8)[0]
    memory.free_decode_buffers()
    del big
    assert pool.pool_idle_bytes() == 8 * BLOCK


def test_sizes_round_up_to_whole_blocks_and_a_new_block_is_reported_untouched(pool):
    a, fresh_a = pool.new_output((1000, 1000), torch.float32)  # 3.8 MiB: a block of 4
    assert fresh_a and a.shape == (1000, 1000) and a.dtype == torch.float32
    address = a.data_ptr()
    del a
    b, fresh_b = pool.new_output((1024, 1024), torch.float32)  # 4 MiB: the same block
    assert b.data_ptr() == address and not fresh_b
    c, _ = pool.new_output((2, 1024, 1024), torch.bfloat16)  # 4 MiB too, but b holds it
    assert c.data_ptr() != address and c.shape == (2, 1024, 1024)


def test_free_decode_buffers_releases_idle_blocks_and_lent_ones_still_return(pool):
    kept, _ = pool.new_output((BLOCK,), torch.uint8)
    gone, _ = pool.new_output((BLOCK,), torch.uint8)
    del gone
    assert pool.pool_idle_bytes() == BLOCK
    memory.free_decode_buffers()
    assert pool.pool_idle_bytes() == 0
    address = kept.data_ptr()
    del kept
    assert pool.pool_idle_bytes() == BLOCK
    assert pool.new_output((BLOCK,), torch.uint8)[0].data_ptr() == address


def test_a_block_returned_while_the_pool_is_busy_waits_for_the_next_caller(pool):
    # torch frees a tensor wherever its last reference goes, also within the pool's own critical
    # section (a garbage collection there): the return must neither block nor be lost.
    t, _ = pool.new_output((BLOCK,), torch.uint8)
    address = t.data_ptr()
    with pool._POOL._lock:
        del t
    assert pool.pool_idle_bytes() == BLOCK
    assert pool.new_output((BLOCK,), torch.uint8)[0].data_ptr() == address


def test_threads_decode_into_blocks_of_their_own(pool):
    args = weight_args()
    expected = decoded_elsewhere(args, torch.bfloat16)
    results, errors = [], []

    def work():
        try:
            mine = [torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16) for _ in range(5)]
            for i in range(20):  # free and take again while the other threads do the same
                mine[i % 5] = torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16)
            results.extend(mine)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({t.data_ptr() for t in results}) == 20  # each live output on a block of its own
    assert all(torch.equal(t, expected) for t in results)


def test_linear4bit_dequantize_and_the_op_agree_on_pooled_memory(pool):
    torch.manual_seed(1)
    layer = qlora_rs.nn.Linear4bit.from_linear(torch.nn.Linear(512, 256, bias=False))
    w = layer.dequantize(torch.float32)
    assert not w.untyped_storage().resizable()
    args = ops.quant_args(layer.packed_weight(), layer.quant_state)
    assert torch.equal(w, decoded_elsewhere(args, torch.float32))
