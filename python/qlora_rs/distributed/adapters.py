"""LoRA adapters of a DDP- or FSDP2-wrapped model in PEFT's layout: :func:`save_adapter` gathers the
shards and rank 0 writes; :func:`load_adapter` reads on every rank and keeps each rank's slice.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FormatError, InvalidArgumentError
from ..nn.lora import _LoraLayer
from .env import _rank_world, unwrap
from .fsdp import _full, _is_dtensor, _local, _local_range


@contextmanager
def _full_lora_weights(model: nn.Module, tensors: dict[tuple[str, str], torch.Tensor]) -> Iterator[None]:
    # save_adapter reads layer.lora_A.weight; for the write on rank 0 those name the gathered
    # full tensors, and the shards FSDP2 manages are put back right after (no forward runs between).
    layers = [(layer, part) for layer in _lora_layers(model).values() for part in ("lora_A", "lora_B")]
    names = {id(layer): name for name, layer in _lora_layers(model).items()}
    saved = []
    try:
        for layer, part in layers:
            module = getattr(layer, part)
            saved.append((module, module._parameters["weight"]))
            module._parameters["weight"] = nn.Parameter(tensors[(names[id(layer)], part)], requires_grad=False)
        yield
    finally:
        for module, param in saved:
            module._parameters["weight"] = param


def _lora_layers(model: nn.Module) -> dict[str, _LoraLayer]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, _LoraLayer)}


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike], **kwargs: Any) -> Optional[Path]:
    """:func:`qlora_rs.save_adapter` for a model under DDP or FSDP2, called on every rank: the
    LoRA matrices are gathered (FSDP2 shards are all-gathered, one tensor at a time) and rank 0
    alone writes the PEFT-layout directory; the others wait for it. Returns the directory on
    rank 0, None elsewhere."""
    from ..surgery.adapter import save_adapter as write

    inner = unwrap(model)
    layers = _lora_layers(inner)
    if not layers:
        raise InvalidArgumentError("save_adapter: the model has no LoRA layers; call qlora_rs.add_lora first")
    rank, _ = _rank_world()
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            full = _full(getattr(layer, part).weight.detach())
            if rank == 0:
                tensors[(name, part)] = full.to("cpu")
    out = None
    if rank == 0:
        with _full_lora_weights(inner, tensors):
            out = write(inner, directory, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """:func:`qlora_rs.load_adapter` for a model under DDP or FSDP2 whose LoRA layers already
    exist (add them before sharding): each rank reads from ``adapter_model.safetensors`` only
    the rows of each matrix that it holds. A model without a process group or sharding may
    also get its layers wrapped here (plain :func:`qlora_rs.load_adapter`)."""
    from safetensors import safe_open

    from ..surgery.adapter import CONFIG_NAME, WEIGHTS_NAME, _read_config
    from ..surgery.adapter import load_adapter as load_plain

    inner = unwrap(model)
    src = Path(directory)
    config = _read_config(src / CONFIG_NAME)
    weights = src / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file")
    layers = _lora_layers(inner)
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        wanted: dict[str, dict[str, str]] = {}
        for key in keys:
            path = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            for part in ("lora_A", "lora_B"):
                for suffix in (f".{part}.weight", f".{part}.default.weight"):
                    if path.endswith(suffix):
                        wanted.setdefault(path[: -len(suffix)], {})[part] = key
        missing = [name for name in wanted if name not in layers]
        if missing:
            sharded = any(_is_dtensor(p) for p in inner.parameters())
            if not sharded and not isinstance(model, nn.parallel.DistributedDataParallel):
                return load_plain(inner, src)
            raise FormatError(
                f"{weights}: the adapter has layers the model has no LoRA on: {missing[:5]}; under DDP/FSDP2 add the "
                "adapters (qlora_rs.add_lora, or load_adapter) before wrapping the model"
            )
        r, alpha = int(config["r"]), config["lora_alpha"]
        with torch.no_grad():
            for name, parts in wanted.items():
                layer = layers[name]
                if layer.r != r or layer.alpha != alpha:
                    raise FormatError(
                        f"{weights}: r={r}, lora_alpha={alpha} but layer {name} has r={layer.r}, alpha={layer.alpha}"
                    )
                for part, key in parts.items():
                    param = getattr(layer, part).weight
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(param.shape):
                        raise FormatError(
                            f"{weights}: {key} is {list(shape)}; the layer needs {list(param.shape)} (r={layer.r})"
                        )
                    start, stop = _local_range(param)
                    local = _local(param)
                    local.copy_(sl[start:stop].to(local.dtype))
    return model
