"""Managed (unified) memory as ordinary torch CUDA tensors, and paging it between GPU and host.

The memory comes from the Rust page manager (``cuMemAllocManaged`` through the CUDA driver
API). A tensor from :func:`managed_empty` is a plain CUDA tensor to torch; the driver may hold
its pages in GPU or host memory, and :func:`page_out` / :func:`page_in` move them explicitly,
asynchronously on the current CUDA stream (ordered with the kernels queued on it).

Safety on shared GPUs: an allocation is refused with :class:`~qlora_rs.OutOfMemoryError`,
before anything is allocated, unless the request plus this process's live managed memory plus a
safety margin (:func:`safety_margin`) fits in the device's free memory: asking for more managed
memory than the GPU has free can hang the GPU. :func:`check_request` is that rule as a pure
function.

Without concurrent managed access (some virtualised GPUs, Windows) allocations still work, but
prefetches to the GPU are skipped (the driver migrates managed memory at each launch there) and
:func:`page_out` raises :class:`~qlora_rs.InvalidArgumentError`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from .. import _lib
from ..errors import CudaError, CudaUnavailableError, InvalidArgumentError

HOST = -1  # the driver's CU_DEVICE_CPU (also _lib.PAGING_HOST)

Tensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def driver_check() -> None:
    """Raises :class:`CudaUnavailableError` with the reason unless the CUDA driver is present,
    recent enough (CUDA 12.2+) and sees a device. Safe to call on machines without a driver."""
    _lib.paging_driver_check()


def available() -> bool:
    """Whether managed-memory paging can be used here (a CUDA device that torch and the
    driver both see)."""
    if not torch.cuda.is_available():
        return False
    try:
        driver_check()
    except CudaUnavailableError:
        return False
    return True


def device_info(device: Any = None) -> dict:
    """``managed_memory``, ``concurrent_managed_access``, ``free``, ``total`` (bytes) and
    ``driver_version`` of a CUDA device (default: the current one)."""
    return dict(_lib.paging_device_info(_cuda_index(device, "device_info")))


def stats() -> dict:
    """Process-wide paging statistics: ``bytes_allocated`` (now), ``peak_bytes_allocated``,
    ``allocations``, ``total_allocations``, ``refused_allocations``, ``bytes_on_host`` (estimate),
    ``bytes_prefetched_to_device`` / ``_to_host``, ``prefetches_to_device`` / ``_to_host`` and
    ``prefetches_skipped`` (no concurrent managed access)."""
    return dict(_lib.paging_stats())


def reset_peak() -> None:
    """Sets ``peak_bytes_allocated`` to the current ``bytes_allocated``."""
    _lib.paging_reset_peak()


def safety_margin(total: int) -> int:
    """Bytes always left free on a device of ``total`` bytes: max(256 MiB, total / 32)."""
    return int(_lib.paging_safety_margin(int(total)))


def check_request(requested: int, free: int, total: int, live_managed: int = 0) -> None:
    """The refusal rule, without a GPU: raises :class:`~qlora_rs.OutOfMemoryError` (with every
    number in the message) unless ``requested + live_managed + safety_margin(total) <= free``."""
    _lib.paging_check_request(int(requested), int(free), int(total), int(live_managed))


def _cuda_index(device: Any, what: str) -> int:
    if not torch.cuda.is_available():
        # The driver check gives the precise reason (no library, no device, too old).
        driver_check()
        raise CudaUnavailableError(f"{what}: torch sees no CUDA device, so managed memory cannot be used")
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise InvalidArgumentError(f"{what}: managed memory lives on a CUDA device, got device {str(dev)!r}")
    return torch.cuda.current_device() if dev.index is None else dev.index


def managed_empty(
    shape: Union[int, Iterable[int]], dtype: torch.dtype = torch.float32, device: Any = None
) -> torch.Tensor:
    """An uninitialised CUDA tensor in managed memory, viewed by torch without a copy.

    The tensor keeps the allocation alive (torch holds a reference to the owner object for as
    long as the storage lives); the memory is freed when the last tensor viewing it goes.
    Raises :class:`~qlora_rs.OutOfMemoryError` before allocating when the request does not fit
    (see the module doc), :class:`~qlora_rs.CudaUnavailableError` without CUDA.
    """
    return _managed_empty_with_owner(shape, dtype, device)[0]


def _managed_empty_with_owner(
    shape: Union[int, Iterable[int]], dtype: torch.dtype, device: Any
) -> tuple[torch.Tensor, Optional[Any]]:
    """:func:`managed_empty` and the ``_lib.ManagedAllocation`` behind it (None for 0 bytes)."""
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"managed_empty: negative dimension in shape {list(shape)}")
    index = _cuda_index(device, "managed_empty")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=f"cuda:{index}"), None
    # torch's CUDA state must exist before the driver call so both use the primary context.
    torch.cuda.init()
    owner = _lib.ManagedAllocation(nbytes, index)
    raw = torch.as_tensor(owner, device=f"cuda:{index}")
    if raw.data_ptr() != owner.ptr or raw.dtype != torch.uint8:
        raise CudaError(
            f"managed_empty: torch copied the managed allocation instead of viewing it "
            f"(data_ptr {raw.data_ptr():#x} != {owner.ptr:#x}); this torch version is not supported"
        )
    # uint8 view first: __cuda_array_interface__ has no bfloat16 type string.
    return raw.view(dtype).view(shape), owner


def _tensor_list(tensors: Tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    out = list(tensors)
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"expected torch tensors, got {type(t).__name__}")
    return out


def _prefetch(tensors: Tensors, to_host: bool, stream: Optional[torch.cuda.Stream], what: str) -> int:
    issued = 0
    for t in _tensor_list(tensors):
        if t.device.type != "cuda":
            continue  # CPU tensors live in ordinary memory: nothing to move
        storage = t.untyped_storage()
        s = stream if stream is not None else torch.cuda.current_stream(t.device)
        dst = HOST if to_host else t.device.index
        try:
            issued += bool(_lib.managed_prefetch(storage.data_ptr(), storage.nbytes(), dst, s.cuda_stream))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{what}: tensor {list(t.shape)} {t.dtype} on {t.device}: {e}") from None
    return issued


def page_out(tensors: Tensors, stream: Optional[torch.cuda.Stream] = None) -> int:
    """Moves the managed storage of each CUDA tensor (all of it: a view pages its whole
    allocation) to host memory, asynchronously on
    ``stream`` (default: the current stream of the tensor's device), freeing its GPU memory.
    CPU tensors are skipped. Returns the number of prefetches issued."""
    return _prefetch(tensors, True, stream, "page_out")


def page_in(tensors: Tensors, stream: Optional[torch.cuda.Stream] = None) -> int:
    """Moves the managed storage of each CUDA tensor back to its GPU, asynchronously on
    ``stream``. CPU tensors are skipped. Returns the number of prefetches issued (0 where the
    device lacks concurrent managed access and the driver migrates at launch instead)."""
    return _prefetch(tensors, False, stream, "page_in")


__all__ = [
    "HOST",
    "available",
    "driver_check",
    "device_info",
    "stats",
    "reset_peak",
    "safety_margin",
    "check_request",
    "managed_empty",
    "page_out",
    "page_in",
]
