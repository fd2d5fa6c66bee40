"""The process group and the rank arithmetic every other part of :mod:`qlora_rs.distributed`
uses: :func:`init_distributed` from torchrun's environment, the default device mesh, sums and
slices over ranks, unwrapping DDP/FSDP models.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine) and
    the ``device`` it computes on. ``world_size`` 1 without a process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    device: Union[str, torch.device, None] = None,
    backend: Optional[str] = None,
    timeout: Optional[datetime.timedelta] = None,
) -> DistEnv:
    """Joins the process group that ``torchrun`` / ``accelerate launch`` describe in the
    environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Without those variables (a plain ``python`` run) nothing is initialized and the result says
    rank 0 of 1. ``device``: ``"cuda"`` (this rank's GPU is ``cuda:LOCAL_RANK``), ``"cpu"``, or
    None for CUDA when available. ``backend``: default ``nccl`` on CUDA, ``gloo`` on the CPU.
    Already inside a process group, it only reports it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from ..errors import CudaUnavailableError

            raise CudaUnavailableError("init_distributed: device 'cuda' was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistEnv(0, 1, 0, device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_main_process() -> bool:
    """True on rank 0, and in a process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _require_process_group(where: str) -> None:
    if not dist.is_initialized():
        raise InvalidArgumentError(
            f"{where}: no torch.distributed process group: launch with torchrun (or accelerate launch) and call "
            "qlora_rs.distributed.init_distributed() first"
        )


def _model_device_type(model: nn.Module) -> Optional[str]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            return t.device.type
    return None


def default_mesh(device_type: Optional[str] = None):
    """A 1-D device mesh over the whole process group (``cuda`` with NCCL, else ``cpu``)."""
    from torch.distributed.device_mesh import init_device_mesh

    _require_process_group("default_mesh")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def global_sum(value: Union[int, float], device: Union[str, torch.device, None] = None) -> float:
    """The sum of ``value`` over all ranks (the value itself without a process group): e.g. the
    number of labelled tokens in the global batch, to normalize each rank's summed loss."""
    if not dist.is_initialized():
        return value
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def rank_slice(items: Sequence[Any], rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    """This rank's share of a global micro-batch: items ``rank, rank + world_size, ...``, so that
    the ranks together see exactly the batch a single process would."""
    r, w = _rank_world()
    r = r if rank is None else rank
    w = w if world_size is None else world_size
    return list(items[r::w])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise; FSDP2 does not wrap)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: for a transformers model the modules of the
    classes in ``_no_split_modules`` (``LlamaDecoderLayer``, ...), else the children of the
    longest ``nn.ModuleList``; empty when there is none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if found:
            return found
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            best = list(m)
    return best
