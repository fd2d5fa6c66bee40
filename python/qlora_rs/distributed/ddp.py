"""DDP with frozen 4-bit weights: :func:`ddp` all-reduces the LoRA gradients only and never
broadcasts the 4-bit state (every rank loaded the same bytes).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .env import _model_device_type, _require_process_group
from .fsdp import _quant_names


def ddp(model: nn.Module, device_ids: Optional[Sequence[Any]] = None, **kwargs: Any) -> nn.Module:
    """Wraps ``model`` in ``DistributedDataParallel`` for QLoRA: gradients of the trainable
    (LoRA) parameters are all-reduced; the 4-bit weights and their quantization buffers are
    left out of DDP's start-up broadcast (each rank loaded the same bytes; a 4-bit 70B model is
    35 GB to broadcast), and buffers are not re-broadcast at every forward
    (``broadcast_buffers=False``) unless ``kwargs`` say otherwise. On CUDA, ``device_ids``
    defaults to the current device."""
    from torch.nn.parallel import DistributedDataParallel

    _require_process_group("ddp")
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidArgumentError("ddp: the model has no trainable parameters; add LoRA adapters (qlora_rs.add_lora) first")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _quant_names(model))
    # Newer torch renames broadcast_buffers (and warns on the old name).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        if "broadcast_buffers" not in kwargs:
            kwargs.setdefault("forward_sync_buffers", False)
    else:
        kwargs.setdefault("broadcast_buffers", False)
    kwargs.setdefault("find_unused_parameters", False)
    device_type = _model_device_type(model)
    if device_ids is None and device_type == "cuda":
        device_ids = [torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
