"""Scale-out on ``torch.distributed``: DDP and FSDP2 (``fully_shard``) with frozen 4-bit weights.

qlora_rs does not bring its own engine; a :class:`~qlora_rs.Linear4bit` model runs under
PyTorch's, launched by ``torchrun`` or ``accelerate launch``. What makes the 4-bit layers fit:

- The packed weight is an ordinary ``nn.Parameter(requires_grad=False)`` (uint8, or a float
  ``quant_storage`` view of the same bytes), so FSDP2 shards it along dim 0 like any other
  parameter and all-gathers 4-bit bytes, not a decoded copy. FSDP2 all-gathers a group of
  mixed dtypes as bytes, and its mixed precision leaves integer parameters alone; a float
  ``quant_storage`` whose dtype differs from ``MixedPrecisionPolicy.param_dtype`` would be
  *converted* (its bytes reinterpreted as numbers and rounded), which :func:`shard_model`
  refuses. Where FSDP2 cannot shard integer parameters at all (torch 2.11), :func:`shard_model`
  views uint8 storage as a float dtype the policy leaves alone (see
  :func:`fsdp_shards_integer_params`).
- The quantization state (block scales, code tables) lives in small buffers that FSDP2 leaves
  whole on every rank: 1/64 byte per weight with double quantization, against the 1/2 byte per
  weight of the packed data that is sharded. Each rank loads the same state, and nothing trains it.
- DDP all-reduces the LoRA gradients only: it skips parameters without ``requires_grad``, so
  the frozen 4-bit weights are never touched and ``find_unused_parameters`` is not needed
  (every adapter gets a gradient every step). :func:`ddp` also keeps DDP from broadcasting the
  4-bit state at start-up and the buffers at every forward; every rank loaded the same bytes.

Entry points: :func:`init_distributed` (from torchrun's environment), :func:`shard_model` /
:func:`ddp`, :func:`load_sharded` (``from_pretrained`` for N ranks: each rank reads its own
rows of the checkpoint), :func:`save_adapter` / :func:`load_adapter` (PEFT layout, written by
rank 0, read slice by slice), and the state-dict helpers over
``torch.distributed.checkpoint.state_dict``.

Every function that takes a model must be called on every rank (they run collectives).
"""

from __future__ import annotations

from .adapters import load_adapter, save_adapter
from .ddp import ddp
from .env import DistEnv, decoder_layers, default_mesh, global_sum, init_distributed, is_main_process, rank_slice, unwrap
from .fsdp import (  # noqa: F401  (fsdp_shards_integer_params: public, outside __all__ as before)
    check_mixed_precision, fsdp_shards_integer_params, get_optimizer_state, get_state_dict, packed_bytes, set_optimizer_state,
    set_state_dict, shard_model,
)
from .sharded_loading import load_sharded
from .training import STRATEGIES, DistributedTraining

__all__ = [
    "DistEnv",
    "init_distributed",
    "is_main_process",
    "default_mesh",
    "decoder_layers",
    "check_mixed_precision",
    "shard_model",
    "ddp",
    "unwrap",
    "packed_bytes",
    "get_state_dict",
    "set_state_dict",
    "get_optimizer_state",
    "set_optimizer_state",
    "save_adapter",
    "load_adapter",
    "load_sharded",
    "global_sum",
    "rank_slice",
    "DistributedTraining",
    "STRATEGIES",
]
