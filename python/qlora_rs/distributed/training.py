""":class:`DistributedTraining`: what the trainer (``qlora_rs.train``) needs from the process
group in one object: wrapping (DDP or FSDP2), the local share of a batch, sums, gathers,
checkpointing of adapters and optimizer state.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidArgumentError
from .adapters import load_adapter, save_adapter
from .ddp import ddp
from .env import default_mesh, global_sum, init_distributed, rank_slice, unwrap
from .fsdp import _full, get_optimizer_state, set_optimizer_state


STRATEGIES = ("auto", "ddp", "fsdp")


class DistributedTraining:
    """What a training loop needs to run unchanged in one process or under ``torchrun``: which
    rank it is, its share of each global micro-batch, global sums, gradient clipping over
    shards, and saving/resuming adapters, optimizer and RNG states. With one process every
    method is the identity (or the plain single-process call), so the loop has one code path.

    ``strategy``: ``"ddp"`` (the default ``"auto"`` under torchrun: each GPU holds the 4-bit
    model) or ``"fsdp"`` (FSDP2: each GPU holds 1/N of it; load the model with
    ``from_pretrained(..., device_mesh=run.mesh, prepare=...)``)."""

    def __init__(self, strategy: str = "auto", device: Union[str, torch.device, None] = None,
                 timeout: Optional[datetime.timedelta] = None) -> None:
        if strategy not in STRATEGIES:
            raise InvalidArgumentError(f"distributed strategy {strategy!r} is not supported: expected one of "
                                       f"{', '.join(STRATEGIES)}")
        self.env = init_distributed(device, timeout=timeout)
        # One process: the plain loop, unless a launcher made a group of one and a strategy was named.
        launched = dist.is_initialized() and (self.world_size > 1 or strategy != "auto")
        self.strategy = ("ddp" if strategy == "auto" else strategy) if launched else "none"
        self._mesh = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def mesh(self) -> Any:
        """The 1-D device mesh (FSDP2), None in one process."""
        if self._mesh is None and self.active:
            self._mesh = default_mesh(self.device.type)
        return self._mesh

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model (``ddp``); the model itself otherwise (FSDP2 shards in place)."""
        if self.strategy == "ddp":
            return ddp(model)
        return model

    def local(self, chunk: Sequence[Any]) -> list:
        """This rank's items of a global micro-batch; a chunk of fewer than ``world_size`` items
        is padded cyclically, as ``DistributedSampler`` pads, so every rank runs the same number
        of forwards (FSDP2 all-gathers in each)."""
        chunk = list(chunk)
        if not self.active:
            return chunk
        if len(chunk) % self.world_size:
            chunk += (chunk * self.world_size)[: self.world_size - len(chunk) % self.world_size]
        return rank_slice(chunk, self.rank, self.world_size)

    def sum(self, value: Union[int, float]) -> Union[int, float]:
        return global_sum(value, self.device) if self.active else value

    def any(self, flag: bool) -> bool:
        return bool(self.sum(int(bool(flag)))) if self.active else bool(flag)

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """``clip_grad_norm_`` over all ranks' gradients (FSDP2 shards included); the norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(_full(norm))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap(model)

    def save_adapter(self, model: nn.Module, directory: Union[str, os.PathLike], **kwargs: Any) -> Optional[Path]:
        if not self.active:
            from ..surgery.adapter import save_adapter as write

            return write(unwrap(model), directory, **kwargs)
        return save_adapter(model, directory, **kwargs)

    def load_adapter(self, model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
        if not self.active:
            from ..surgery.adapter import load_adapter as read

            read(unwrap(model), directory)
            return model
        return load_adapter(model, directory)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` in one process; under DDP/FSDP2 the state keyed by
        parameter names, gathered on rank 0."""
        if not self.active:
            return optimizer.state_dict()
        return get_optimizer_state(model, optimizer, full=True)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.active:
            optimizer.load_state_dict(state)
        else:
            set_optimizer_state(model, optimizer, state if self.is_main else {}, full=True)

    def gather(self, obj: Any) -> Any:
        """Every rank's ``obj`` as a list (rank order); ``obj`` itself in one process."""
        if not self.active:
            return obj
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def pick(self, gathered: Any) -> Any:
        """This rank's item of what :meth:`gather` returned (the object itself in one process)."""
        if not self.active and not isinstance(gathered, list):
            return gathered
        if not isinstance(gathered, list) or len(gathered) != self.world_size:
            have = len(gathered) if isinstance(gathered, list) else 1
            raise InvalidArgumentError(
                f"the checkpoint was written by {have} process(es) and this run has {self.world_size}: resume with the "
                "same number of processes (torchrun --nproc-per-node)"
            )
        return gathered[self.rank]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
