"""The Rust page manager through Python: the refusal rule, statistics, and clear errors without a
CUDA driver; GPU-marked tests check managed tensors on a device."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_rs import CudaError, CudaUnavailableError, InvalidArgumentError, OutOfMemoryError, _lib
from qlora_rs.optim import paging

GIB = 1 << 30
MIB = 1 << 20
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


# ---------------------------------------------------------------------------- the refusal rule


def test_safety_margin_is_max_of_256mib_and_a_32nd():
    assert paging.safety_margin(0) == 256 * MIB
    assert paging.safety_margin(4 * GIB) == 256 * MIB
    assert paging.safety_margin(141 * GIB) == 141 * GIB // 32


def test_requests_that_fit_pass():
    total, free = 80 * GIB, 40 * GIB
    margin = paging.safety_margin(total)
    paging.check_request(free - margin, free, total)
    paging.check_request(free - margin - 10 * GIB, free, total, live_managed=10 * GIB)


def test_request_one_byte_over_is_refused_with_every_number():
    total, free = 80 * GIB, 40 * GIB
    margin = paging.safety_margin(total)
    with pytest.raises(OutOfMemoryError) as e:
        paging.check_request(free - margin - GIB + 1, free, total, live_managed=GIB)
    msg = str(e.value)
    assert f"({free - margin - GIB + 1} bytes) refused" in msg
    assert f"({free} bytes) free of 80.00 GiB ({total} bytes)" in msg
    assert f"1.00 GiB ({GIB} bytes) of managed memory already allocated" in msg
    assert f"safety margin of 2.50 GiB ({margin} bytes)" in msg
    assert "can hang a shared GPU" in msg
    # The error is a CUDA error and a MemoryError, so generic handlers catch it.
    assert isinstance(e.value, CudaError) and isinstance(e.value, MemoryError)


def test_free_memory_below_the_margin_refuses_everything():
    with pytest.raises(OutOfMemoryError, match="at most 0 bytes can be allocated"):
        paging.check_request(1, 100 * MIB, 8 * GIB)


def test_zero_byte_request_is_an_invalid_argument():
    with pytest.raises(InvalidArgumentError, match="needs at least one byte"):
        paging.check_request(0, 40 * GIB, 80 * GIB)


@given(
    requested=st.integers(1, 1 << 50),
    free=st.integers(0, 1 << 50),
    total=st.integers(0, 1 << 50),
    live=st.integers(0, 1 << 50),
)
def test_refusal_rule_property(requested, free, total, live):
    allowed = requested + live + max(256 * MIB, total // 32) <= free
    try:
        paging.check_request(requested, free, total, live)
        assert allowed
    except OutOfMemoryError:
        assert not allowed


def test_huge_numbers_do_not_overflow():
    big = (1 << 64) - 1
    with pytest.raises(OutOfMemoryError):
        paging.check_request(big, big, big, big)


# ---------------------------------------------------------------------------- statistics


_FRESH = """
import json, torch, qlora_rs
out = {"stats": qlora_rs.optim.paging.stats()}
if not torch.cuda.is_available():
    try:
        qlora_rs._lib.ManagedAllocation(1024, 0)
        out["alloc"] = "allocated"
    except qlora_rs.CudaUnavailableError as e:
        out["alloc"] = "refused: " + str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_process():
    """One new interpreter (imports are slow) that reads the stats first, then, without CUDA,
    tries an allocation: a panic or abort in the driver loader would show as a failure here."""
    return subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True)


def test_stats_start_at_zero_in_a_fresh_process(fresh_process):
    assert fresh_process.returncode == 0, fresh_process.stderr
    stats = json.loads(fresh_process.stdout)["stats"]
    assert set(stats) == {
        "bytes_allocated", "peak_bytes_allocated", "allocations", "total_allocations", "refused_allocations",
        "bytes_on_host", "bytes_prefetched_to_device", "bytes_prefetched_to_host", "prefetches_to_device",
        "prefetches_to_host", "prefetches_skipped",
    }
    assert all(v == 0 for v in stats.values()), stats


def test_reset_peak_keeps_the_other_counters():
    before = paging.stats()
    paging.reset_peak()
    after = paging.stats()
    assert after["peak_bytes_allocated"] == after["bytes_allocated"]
    assert {k: v for k, v in after.items() if k != "peak_bytes_allocated"} == {
        k: v for k, v in before.items() if k != "peak_bytes_allocated"
    }


# ---------------------------------------------------------------------------- errors without CUDA


@no_cuda
def test_driver_check_explains_why_cuda_is_unavailable():
    with pytest.raises(CudaUnavailableError, match="CUDA"):
        paging.driver_check()
    assert paging.available() is False


@no_cuda
def test_allocation_without_driver_is_a_clear_error_not_a_crash(fresh_process):
    assert fresh_process.returncode == 0, fresh_process.stderr
    alloc = json.loads(fresh_process.stdout)["alloc"]
    assert alloc.startswith("refused: ") and "CUDA" in alloc, alloc
    assert "panicked" not in fresh_process.stderr
    with pytest.raises(CudaUnavailableError):
        _lib.ManagedAllocation(1024, 0)
    with pytest.raises(CudaUnavailableError):
        paging.device_info()
    with pytest.raises(CudaUnavailableError):
        paging.managed_empty((4, 4))
    assert paging.stats()["allocations"] == 0


def test_prefetch_of_memory_not_from_qlora_rs_is_refused():
    with pytest.raises(InvalidArgumentError, match="is not inside a live managed allocation made by qlora_rs"):
        _lib.managed_prefetch(0x1234, 16, -1)
    with pytest.raises(InvalidArgumentError, match="invalid location -2"):
        _lib.managed_prefetch(0x1234, 16, -2)


def test_page_calls_skip_cpu_tensors():
    t = torch.zeros(8)
    assert paging.page_out(t) == 0
    assert paging.page_in([t, torch.ones(3)]) == 0
    with pytest.raises(InvalidArgumentError, match="expected torch tensors"):
        paging.page_out([t, 3])


def test_managed_empty_checks_its_arguments():
    with pytest.raises(InvalidArgumentError, match="negative dimension"):
        paging.managed_empty((2, -1))
    if torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="managed memory lives on a CUDA device"):
            paging.managed_empty((2,), device="cpu")
    else:
        with pytest.raises(CudaUnavailableError):
            paging.managed_empty((2,), device="cpu")


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_managed_tensor_is_a_zero_copy_view_kept_alive_by_the_tensor():
    start = paging.stats()
    t, owner = paging._managed_empty_with_owner((1024, 256), torch.bfloat16, "cuda")
    assert t.is_cuda and t.dtype == torch.bfloat16 and t.shape == (1024, 256)
    assert t.data_ptr() == owner.ptr and owner.nbytes == 1024 * 256 * 2
    del owner
    gc.collect()
    t.fill_(1.5)
    assert t.float().sum().item() == 1.5 * 1024 * 256
    s = paging.stats()
    assert s["bytes_allocated"] == start["bytes_allocated"] + 1024 * 256 * 2
    view = t[10:20]
    del t
    gc.collect()
    assert paging.stats()["allocations"] == start["allocations"] + 1  # the view keeps it
    del view
    gc.collect()
    assert paging.stats()["bytes_allocated"] == start["bytes_allocated"]


@pytest.mark.gpu
def test_page_out_and_in_count_prefetches():
    info = paging.device_info()
    t = paging.managed_empty((4 * MIB,), torch.float32)
    t.zero_()
    start = paging.stats()
    n_out = paging.page_out(t)
    n_in = paging.page_in(t)
    torch.cuda.synchronize()
    s = paging.stats()
    if info["concurrent_managed_access"]:
        assert (n_out, n_in) == (1, 1)
        assert s["bytes_prefetched_to_host"] - start["bytes_prefetched_to_host"] == 16 * MIB
        assert s["bytes_prefetched_to_device"] - start["bytes_prefetched_to_device"] == 16 * MIB
    assert t.sum().item() == 0.0


@pytest.mark.gpu
def test_device_refuses_more_than_free_memory_before_allocating():
    free, _ = torch.cuda.mem_get_info()
    start = paging.stats()
    with pytest.raises(OutOfMemoryError, match="refused"):
        _lib.ManagedAllocation(free + GIB, torch.cuda.current_device())
    s = paging.stats()
    assert s["refused_allocations"] == start["refused_allocations"] + 1
    assert s["bytes_allocated"] == start["bytes_allocated"]
