"""Memory the CPU ops use again instead of asking the C library for it at each call.

A CPU tensor of 32 MiB or more is a fresh ``mmap`` each time the C library hands it out (glibc's
largest threshold for reusing freed memory), and its pages then fault in on first touch: 2-23 ms
for a 4096x4096 bf16 weight on a 2-core Zen 5 VM (8.6-9.5 ms with 4 KiB pages, 2-23 ms with huge
pages, depending on the phase the VM is in), where decoding into memory already in use takes
about 1 ms. Two kinds of reuse avoid it:

- :func:`decode_buffer`: one buffer per thread and dtype for weights decoded only to be multiplied
  (the larger products and the input gradient in training's backward); the next decode overwrites it.
- :func:`new_output`: tensors handed to the caller (``torch.ops.qlora_rs.dequantize_4bit`` on the
  CPU, and with it ``Linear4bit.dequantize``, merging and saving). Their memory is a block of a pool;
  when torch frees the tensor (and every view of it), the block goes back to the pool for the next
  output of its size. Idle blocks beyond :data:`POOL_IDLE_BYTES` are released, the least recently
  used first. Such tensors work as any other, but their storage cannot be resized (``resize_``).

:func:`free_decode_buffers` releases both.
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import threading
import weakref
from typing import Sequence

import torch

# The decoded weights of the larger CPU products go into a buffer per thread and dtype, kept and
# grown to the largest weight decoded so far.
_thread_buffers = threading.local()


def _decode_buffers() -> dict:
    buffers = getattr(_thread_buffers, "buffers", None)
    if buffers is None:
        buffers = _thread_buffers.buffers = {}
    return buffers


def decode_buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer of at least ``n`` elements of ``dtype`` for decoded weights (its first
    ``n`` elements), reallocated only when a larger weight comes. It holds the largest weight
    decoded so far in this thread; :func:`free_decode_buffers` lets it go."""
    buffers = _decode_buffers()
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < n:
        buffers.pop(dtype, None)  # the old one goes before the new one comes
        buffer = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buffer[:n]


def _kept_from(y: torch.Tensor) -> torch.Tensor:
    """``y``, a product of a weight decoded into this thread's buffer. When autograd recorded it,
    the graph may have saved the decoded weight for its backward: the buffer is the graph's now,
    and the next decode goes into a new one."""
    if y.requires_grad:
        _decode_buffers().pop(y.dtype, None)
    return y


def free_decode_buffers() -> None:
    """Frees this thread's buffers of decoded weights (the next product above
    ``CPU_FUSED_GEMM_MAX_M`` rows allocates again) and the idle blocks of the output pool
    (:func:`new_output`; blocks of live tensors return to it when those are freed)."""
    _decode_buffers().clear()
    _POOL.release_idle()


# Outputs of at least this many bytes come from the pool: below it glibc reuses freed memory
# itself (measured on the Zen 5 VM, bf16 decode into a new tensor vs a reused one: 4 MiB 0.07 vs
# 0.06 ms, 16 MiB 0.46 vs 0.46; 32 MiB 2.6-7.4 vs 0.9; 64 MiB float32 20.6-21.8 vs 1.7).
POOL_MIN_BYTES = 32 << 20

# Idle blocks are kept up to this many bytes in all (the most recently returned one always): a
# merge of a 7-8B model in float32 cycles through about 300 MiB of block sizes.
POOL_IDLE_BYTES = 512 << 20

# Block sizes are whole huge pages, so that outputs of nearly the same size share blocks.
_HUGE_PAGE = 2 << 20


class _OutputPool:
    """Blocks of anonymous memory lent out as tensors (``torch.frombuffer`` over a memoryview of
    the block). torch holds the memoryview for as long as the tensor's storage lives; when it lets
    go, a finalizer puts the block back. That may happen in any thread, also inside this pool's own
    critical section (a collection of garbage): returned blocks first go to a queue, which whoever
    holds the lock settles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list = []  # (size, block), least recently returned first
        self._returned: collections.deque = collections.deque()

    def reset_lock(self) -> None:
        """A new lock (in a forked child: the parent's may have been held by another thread)."""
        self._lock = threading.Lock()

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> tuple:
        """(an uninitialized tensor of ``shape`` and ``dtype`` on a pool block, whether the block is
        new: its pages not yet touched)."""
        n = math.prod(shape)
        size = -(-n * dtype.itemsize // _HUGE_PAGE) * _HUGE_PAGE
        block = None
        with self._lock:
            self._settle()
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i][0] == size:
                    block = self._idle.pop(i)[1]
                    break
        fresh = block is None
        if fresh:
            block = mmap.mmap(-1, size)
        view = memoryview(block)
        out = torch.frombuffer(view, dtype=dtype, count=n).view(shape)
        weakref.finalize(view, self._give_back, size, block).atexit = False
        return out, fresh

    def _give_back(self, size: int, block: mmap.mmap) -> None:
        self._returned.append((size, block))
        if self._lock.acquire(blocking=False):
            try:
                self._settle()
            finally:
                self._lock.release()

    def _settle(self) -> None:
        """Moves returned blocks to the idle ones and releases what exceeds the budget (lock held)."""
        while self._returned:
            self._idle.append(self._returned.popleft())
        held = sum(size for size, _ in self._idle)
        while len(self._idle) > 1 and held > POOL_IDLE_BYTES:
            held -= self._idle.pop(0)[0]

    def release_idle(self) -> None:
        with self._lock:
            self._settle()
            self._idle.clear()

    def idle_bytes(self) -> int:
        """Bytes of the blocks waiting for reuse (returned blocks not yet settled included)."""
        with self._lock:
            self._settle()
            return sum(size for size, _ in self._idle)


_POOL = _OutputPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.reset_lock)


def new_output(shape: Sequence[int], dtype: torch.dtype) -> tuple:
    """An uninitialized CPU tensor of ``shape`` and ``dtype`` for a kernel to write, and whether
    its memory is untouched (the kernels then ask for huge pages and store through the caches):
    from the pool at :data:`POOL_MIN_BYTES` or more, else ``torch.empty``."""
    if math.prod(shape) * dtype.itemsize < POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype), True
    return _POOL.tensor(shape, dtype)


def pool_idle_bytes() -> int:
    """Bytes the output pool holds for reuse (blocks no tensor uses)."""
    return _POOL.idle_bytes()
