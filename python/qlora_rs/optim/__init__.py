"""Paged optimizers: AdamW with its state in CUDA managed memory (:class:`PagedAdamW`, float32
states; :class:`PagedAdamW8bit`, blockwise 8-bit states), and the managed-memory helpers under
them (:mod:`qlora_rs.optim.paging`). On CPU parameters the same classes use ordinary memory."""

from . import paging
from .adamw import PagedAdamW, PagedAdamW8bit
from .paging import managed_empty, page_in, page_out

__all__ = ["PagedAdamW", "PagedAdamW8bit", "paging", "managed_empty", "page_in", "page_out"]
