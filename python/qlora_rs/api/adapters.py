"""``qlora_rs.save_adapter``: written by this process, or gathered from the ranks of an FSDP2-sharded
model first (:func:`qlora_rs.distributed.save_adapter`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..distributed.adapters import save_adapter as save_gathered
from ..surgery.adapter import has_sharded_lora, unwrap_ddp
from ..surgery.adapter import save_adapter as write

__all__ = ["save_adapter"]


def save_adapter(
    model: torch.nn.Module,
    directory: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> Optional[Path]:
    """Writes the model's LoRA adapters to ``directory`` in PEFT's layout (see
    :mod:`qlora_rs.surgery.adapter`); returns the directory. Each file is written to a temporary
    file next to its destination, synced and renamed into place.

    A model sharded with FSDP2 is handled as :func:`qlora_rs.distributed.save_adapter` does: call
    it on every rank; the shards are gathered and rank 0 writes (the other ranks return None).
    A DDP-wrapped model is unwrapped (it may be saved from rank 0 alone)."""
    if has_sharded_lora(unwrap_ddp(model)):
        return save_gathered(model, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    return write(model, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
