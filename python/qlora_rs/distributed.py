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

import datetime
import inspect
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from .errors import FormatError, InvalidArgumentError
from .nn.linear4bit import Linear4bit
from .nn.lora import _LoraLayer
from .quant_state import QuantState, dtype_name

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

_log = logging.getLogger("qlora_rs")

# Keys a Linear4bit adds next to "<layer>.weight" in its state dict (bitsandbytes' layout).
_COMPANION = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
              ".weight.quant_state.")


# --------------------------------------------------------------------------------------------
# Process group


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
            from .errors import CudaUnavailableError

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


# --------------------------------------------------------------------------------------------
# Wrapping


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


def _storage_of(layer: Linear4bit) -> torch.dtype:
    return layer.weight.dtype


def check_mixed_precision(model: nn.Module, mp_policy: Any) -> None:
    """Refuses a ``MixedPrecisionPolicy`` that would cast packed 4-bit bytes.

    FSDP2 converts every floating-point parameter to ``param_dtype`` before its all-gather; for
    a weight whose packed bytes are viewed as another float dtype (``quant_storage``), that
    conversion rewrites the bytes as numbers and the layer would decode noise (or, between two
    16-bit dtypes, silently wrong weights). uint8 storage is never converted, nor a float view
    of the very dtype the policy asks for. (Should a torch cast anyway, or ``fully_shard`` be
    called directly, :class:`Linear4bit` refuses the converted weight at its first forward.)"""
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype is None:
        return
    bad = [(name, _storage_of(m)) for name, m in unwrap(model).named_modules()
           if isinstance(m, Linear4bit) and _storage_of(m).is_floating_point and _storage_of(m) != param_dtype]
    if bad:
        name, storage = bad[0]
        raise InvalidArgumentError(
            f"MixedPrecisionPolicy(param_dtype={dtype_name(param_dtype)}) would cast the packed 4-bit weight of {name} "
            f"(and {len(bad) - 1} other layer(s)), stored as {dtype_name(storage)} (quant_storage), to "
            f"{dtype_name(param_dtype)}, destroying its bytes; quantize with quant_storage=torch.uint8 (never cast) or "
            f"quant_storage=torch.{dtype_name(param_dtype)}, or use param_dtype=None"
        )


_fsdp_integer_params: Optional[bool] = None


def fsdp_shards_integer_params(mesh: Any) -> bool:
    """Whether this torch's FSDP2 shards parameters of an integer dtype (with
    ``requires_grad=False``). Before pytorch/pytorch#177948 (torch 2.11 among them)
    ``fully_shard`` rebuilds every parameter as ``nn.Parameter(shard)``, which requires a gradient
    and fails for uint8. Probed once on ``mesh`` with a meta-device parameter: no memory, no
    collective."""
    global _fsdp_integer_params
    if _fsdp_integer_params is None:
        from torch.distributed.fsdp import fully_shard

        probe = nn.Module()
        probe.packed = nn.Parameter(torch.zeros(2, 1, dtype=torch.uint8, device="meta"), requires_grad=False)
        try:
            fully_shard(probe, mesh=mesh)
            _fsdp_integer_params = True
        except RuntimeError as e:
            if "floating point" not in str(e):
                raise
            _fsdp_integer_params = False
    return _fsdp_integer_params


def _float_storage_for_fsdp(model: nn.Module, mp_policy: Any) -> None:
    """Views the packed bytes of every integer-stored 4-bit weight as a float dtype that the
    policy does not cast (``param_dtype``, else bfloat16): how bitsandbytes' ``quant_storage``
    gets 4-bit weights through FSDP. The bytes, and so the layer's output, do not change."""
    storage = getattr(mp_policy, "param_dtype", None) or torch.bfloat16
    for name, m in unwrap(model).named_modules():
        if isinstance(m, Linear4bit) and not m.weight.dtype.is_floating_point:
            try:
                m.set_quant_storage_(storage)
            except InvalidArgumentError:
                raise InvalidArgumentError(
                    f"shard_model: FSDP2 in torch {torch.__version__} cannot shard integer parameters, so the packed "
                    f"4-bit weight of {name} ({m.out_features}x{m.in_features}) must be viewed as {dtype_name(storage)}, "
                    f"but its {m.packed_weight().numel()} bytes are not a whole number of {dtype_name(storage)} elements; "
                    "use a torch newer than 2.11 (with pytorch/pytorch#177948), or leave that layer unquantized"
                ) from None


def shard_model(
    model: nn.Module,
    mesh: Any = None,
    *,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    layers: Optional[Sequence[nn.Module]] = None,
) -> nn.Module:
    """Applies FSDP2's ``fully_shard`` to each decoder layer (see :func:`decoder_layers`, or
    ``layers``) and then to the root, after :func:`check_mixed_precision`. Returns ``model``
    (now also an ``FSDPModule``); its parameters, the packed 4-bit weights included, are
    ``DTensor`` shards along dim 0.

    Add LoRA adapters before sharding, so that FSDP2 manages (and reduces the gradients of)
    their parameters too. ``mesh``: default a 1-D mesh over the whole process group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _require_process_group("shard_model")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise InvalidArgumentError("shard_model: the model is wrapped in DistributedDataParallel; use one of DDP or FSDP2")
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    check_mixed_precision(model, mp_policy)
    if mesh is None:
        device_type = _model_device_type(model)
        mesh = default_mesh(device_type if device_type not in (None, "meta") else None)
    if not fsdp_shards_integer_params(mesh):
        _float_storage_for_fsdp(model, mp_policy)
    blocks = decoder_layers(model) if layers is None else list(layers)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


def _quant_names(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            prefix = f"{name}." if name else ""
            out.append(prefix + "weight")
            out += [prefix + b for b, t in m.named_buffers(recurse=False) if t is not None]
    return out


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


def packed_bytes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer name: (bytes of its packed weight on this rank, bytes of the whole weight)}``
    for every :class:`Linear4bit`; under FSDP2 the first is this rank's shard."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, Linear4bit):
            w = m.weight
            local = w.to_local() if isinstance(w, DTensor) else w
            out[name] = (local.numel() * local.element_size(), w.numel() * w.element_size())
    return out


# --------------------------------------------------------------------------------------------
# State dicts


def _reshard(model: nn.Module) -> None:
    # A root module keeps its parameters gathered after a forward without backward (no_grad);
    # state-dict code must see the shards.
    from torch.distributed.fsdp import FSDPModule

    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def get_state_dict(
    model: nn.Module,
    *,
    full: bool = True,
    cpu_offload: bool = True,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """The model's state dict through ``torch.distributed.checkpoint.state_dict``, 4-bit layers
    in bitsandbytes' layout (the packed weight plus its ``.absmax``/``.quant_map``/... entries).

    ``full=True``: plain tensors, all-gathered (with ``cpu_offload`` only rank 0 gets them, on
    the CPU; the others get an empty dict); ``full=False``: this rank's ``DTensor`` shards, for
    :func:`set_state_dict` with the same world size or ``torch.distributed.checkpoint.save``.
    ``trainable_only`` keeps the LoRA parameters alone. Keys never carry DDP's ``module.``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _reshard(model)
    options = StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(model, options=options)
    if trainable_only:
        # DCP drops the frozen packed weights but not their companions (not parameters).
        sd = {k: v for k, v in sd.items() if not _is_companion(k) or _weight_key(k) in sd}
    return sd


def _is_companion(key: str) -> bool:
    return any(c in key for c in _COMPANION)


def _weight_key(companion: str) -> str:
    return companion[: companion.index(".weight.") + len(".weight")]


@contextmanager
def _inject_on_load(model: nn.Module, extra: dict[str, Any]) -> Iterator[None]:
    # DCP's broadcast drops state-dict entries that name no parameter or buffer (the 4-bit
    # companions); a pre-hook on the root puts them back into the dict that load_state_dict walks.
    if not extra:
        yield
        return

    def hook(state_dict, prefix, *args):
        for k, v in extra.items():
            state_dict.setdefault(prefix + k, v)

    handle = model._register_load_state_dict_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def set_state_dict(
    model: nn.Module,
    state_dict: dict[str, Any],
    *,
    full: bool = True,
    broadcast_from_rank0: bool = False,
    strict: bool = True,
) -> Any:
    """Loads a state dict from :func:`get_state_dict` (or any with the same keys) into a model
    sharded like the one it came from (``full=False``) or sharded any way (``full=True``: each
    rank keeps its part of the full tensors). ``broadcast_from_rank0``: only rank 0 holds
    ``state_dict`` (the others pass ``{}``) and sends each tensor to the others in turn.
    ``strict=False`` for partial dicts (``trainable_only``). Returns the missing/unexpected keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _reshard(model)
    extra: dict[str, Any] = {}
    if broadcast_from_rank0:
        _require_process_group("set_state_dict(broadcast_from_rank0=True)")
        companions = [{k: v.cpu() for k, v in state_dict.items() if _is_companion(k)} if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(companions, src=0)
        extra = companions[0]
        if dist.get_rank() == 0:
            state_dict = {k: v for k, v in state_dict.items() if not _is_companion(k)}
    device = next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
    extra = {k: v.to(device) for k, v in extra.items()}
    options = StateDictOptions(full_state_dict=full, broadcast_from_rank0=broadcast_from_rank0, strict=strict)
    with _inject_on_load(unwrap(model), extra):
        return set_model_state_dict(model, state_dict, options=options)


def get_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool = True) -> dict:
    """The optimizer's state keyed by parameter names (``torch.distributed.checkpoint``'s
    layout); ``full=True`` gathers it on rank 0 (CPU) so that it can be saved in one file and
    resumed at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    _reshard(model)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def set_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, full: bool = True) -> None:
    """Loads what :func:`get_optimizer_state` returned; with ``full=True`` only rank 0 needs
    ``state`` (the others may pass ``{}``): it is broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    _reshard(model)
    options = StateDictOptions(full_state_dict=full, broadcast_from_rank0=full and dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state, options=options)


# --------------------------------------------------------------------------------------------
# Adapters


def _local_range(t: Any) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dim 0 that this rank holds of a DTensor sharded on dim 0 (all
    rows of a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return 0, t.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        raise InvalidArgumentError(
            f"a parameter is sharded as {t.placements} over dimensions other than 0; qlora_rs reads row shards only"
        )
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _local(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


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
    from .adapter import save_adapter as write

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

    from .adapter import CONFIG_NAME, WEIGHTS_NAME, _read_config
    from .adapter import load_adapter as load_plain

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


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# --------------------------------------------------------------------------------------------
# Loading for N ranks


def _set_quant_state(layer: Linear4bit, state: QuantState, device: torch.device) -> None:
    """The layer's quantization buffers and options from ``state``; its (sharded) weight untouched."""
    if tuple(state.shape) != (layer.out_features, layer.in_features):
        raise FormatError(f"{layer._describe()}: the checkpoint's quantization state is for shape {list(state.shape)}")
    layer._set_quant_state(state, device)


class _RowReader:
    """Reads row ranges of checkpoint tensors (safetensors slices: only those bytes are read)."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.handles: dict[Path, Any] = {}

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        file = self.ckpt.entries[key].file
        handle = self.handles.get(file)
        if handle is None:
            handle = self.handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_slice(key)[start:stop]

    def close(self) -> None:
        self.handles.clear()


def load_sharded(
    path: Union[str, os.PathLike],
    mesh: Any = None,
    *,
    quantization: Any = None,
    compute_dtype: Any = None,
    dtype: Any = None,
    model_class: Any = None,
    strict: bool = True,
    config: Any = None,
    prepare: Optional[Callable[[nn.Module], Any]] = None,
    mp_policy: Any = None,
    quant_storage: torch.dtype = torch.uint8,
    layers: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None,
) -> nn.Module:
    """:func:`qlora_rs.from_pretrained` for N ranks under FSDP2, called on every rank.

    The model is built on the meta device with its linear layers as :class:`Linear4bit`,
    ``prepare(model)`` runs on that skeleton (add LoRA adapters there, e.g.
    ``prepare=lambda m: qlora_rs.add_lora(m, r=16)``), it is sharded with :func:`shard_model`,
    and only then filled: each rank reads from the safetensors file(s) only the rows of each
    tensor that it holds, plus the small quantization state of every 4-bit layer. A float
    checkpoint is quantized one layer at a time (each rank reads and quantizes the layer, then
    keeps its rows), so no rank ever holds more than one 16-bit layer. LoRA matrices (absent
    from the checkpoint) are initialized as ``add_lora`` does, full-size from the global RNG and
    then cut, so every rank agrees when the ranks share a seed.

    Arguments as :func:`qlora_rs.from_pretrained`, plus ``mesh`` (default: 1-D over the process
    group), ``mp_policy`` and ``layers`` (passed to :func:`shard_model`), ``quant_storage`` of
    the 4-bit weights. The model is returned in eval mode.
    """
    from transformers import AutoConfig

    from . import loading as L

    _require_process_group("load_sharded")
    path = Path(path)
    if mesh is None:
        mesh = default_mesh()
    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if config is None:
        if not (path / L.CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {L.CONFIG_FILE} (load_sharded needs a model directory)")
        config = AutoConfig.from_pretrained(str(path))
    with L.Checkpoint(path) as ckpt:
        quantized = ckpt.quantized_weights()
        opts = L.QuantOptions.parse(quantization, compute_dtype)
        if opts is None:
            raise InvalidArgumentError("load_sharded: quantization=False is not supported (it loads 4-bit models)")
        if quantized:
            qt, bs, dq = L._checkpoint_options(ckpt, quantized)
            opts.quant_type, opts.blocksize, opts.double_quant = qt, bs, dq
        param_dtype = L.parse_dtype(dtype) if dtype is not None else opts.compute_dtype
        if getattr(config, "quantization_config", None) is not None:
            config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        model = L.build_skeleton(config, L.auto_class(config, model_class), param_dtype)
        prefix = getattr(model, "base_model_prefix", "") or ""
        resolve = L._key_resolver(set(model.state_dict(keep_vars=True)), prefix)
        companions = {k for parts in quantized.values() for k in parts.values()}
        source = {}  # model key -> checkpoint key
        for key in ckpt.entries:
            target = None if key in companions else resolve(key)
            if target is not None:
                source.setdefault(target, key)
        # model key of a 4-bit weight -> (checkpoint key, {part: checkpoint key of its companion})
        quant_source = {resolve(w): (w, parts) for w, parts in quantized.items() if resolve(w) is not None}
        unexpected = [k for k in ckpt.entries if resolve(k) is None and not L._QUANT_SUFFIX.match(k)
                      and not L._IGNORED_EXTRA.search(k)]
        if unexpected and strict:
            raise FormatError(f"{ckpt.directory}: the checkpoint has tensors that {type(model).__name__} does not have: "
                              f"{L._list(unexpected)} (pass strict=False to ignore them)")
        if quantized:
            targets = [k.rsplit(".", 1)[0] for k in quant_source]
        else:
            targets = L.linear_targets(model, opts.skip_modules)
        layers4: dict[str, Linear4bit] = {}
        for name in targets:
            layers4[name] = _meta_linear4bit(model, name, opts, quant_storage)
        if L._tied_keys(model):
            model.tie_weights()
        if prepare is not None:
            prepare(model)
        shard_model(model, mesh, mp_policy=mp_policy, layers=layers(model) if layers is not None else None)
        kept = {n: b.to(device) for n, b in model.named_buffers() if b is not None and b.device.type != "meta"}
        model.to_empty(device=device)
        for n, b in kept.items():
            L._set_tensor(model, n, b)
        reader = _RowReader(ckpt)
        try:
            _fill(model, ckpt, reader, quant_source, source, device, strict)
        finally:
            reader.close()
    model.eval()
    model.qlora_rs_checkpoint = {
        "kind": "4bit" if quantized else "float", "path": str(path), "quantized_modules": sorted(layers4),
        "quantization": {"quant_type": opts.quant_type, "blocksize": opts.blocksize, "double_quant": opts.double_quant,
                         "compute_dtype": dtype_name(opts.compute_dtype)},
        "sharded": {"world_size": dist.get_world_size(), "mesh": str(mesh)},
    }
    return model


def _meta_linear4bit(model: nn.Module, name: str, opts: Any, quant_storage: torch.dtype) -> Linear4bit:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear) or isinstance(old, Linear4bit):
        raise FormatError(f"{name}: load_sharded quantizes nn.Linear layers; the model has a {type(old).__name__} there")
    layer = Linear4bit(
        old.in_features, old.out_features, bias=old.bias is not None, quant_type=opts.quant_type,
        blocksize=opts.blocksize, double_quant=opts.double_quant, compute_dtype=opts.compute_dtype,
        quant_storage=quant_storage, device="meta", dtype=old.weight.dtype,
    )
    if old.bias is not None:
        layer.bias = nn.Parameter(torch.empty(old.out_features, device="meta", dtype=old.bias.dtype))
    layer._qlora_name = name
    setattr(parent, attr, layer)
    return layer


def _base_name(module_name: str, lora_names: set[str]) -> str:
    # "x.q_proj.base_layer" is the checkpoint's "x.q_proj" once LoRA wraps it.
    for n in lora_names:
        if module_name == n + ".base_layer":
            return n
    return module_name


@torch.no_grad()
def _fill(model, ckpt, reader, quant_source, source, device, strict) -> None:
    lora = _lora_layers(model)
    lora_names = set(lora)
    lora_params = {id(getattr(l, p).weight) for l in lora.values() for p in ("lora_A", "lora_B")}
    missing = []
    for full_name, param in model.named_parameters():
        module_name, _, attr = full_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if id(param) in lora_params:
            continue
        key_module = _base_name(module_name, lora_names)
        model_key = f"{key_module}.{attr}" if key_module else attr
        start, stop = _local_range(param)
        local = _local(param)
        if isinstance(module, Linear4bit) and attr == "weight":
            _fill_4bit(module, local, start, stop, ckpt, reader, quant_source.get(model_key), source.get(model_key),
                       model_key, device)
            continue
        key = source.get(model_key)
        if key is None:
            missing.append(model_key)
            continue
        entry = ckpt.entries[key]
        if tuple(entry.shape) != tuple(param.shape):
            raise FormatError(f"{entry.file}: {key} has shape {list(entry.shape)}; the model expects {list(param.shape)} "
                              f"for {model_key}")
        local.copy_(reader.rows(key, start, stop).to(local.dtype))
    if missing:
        if strict:
            raise FormatError(f"{ckpt.directory}: the checkpoint lacks tensors of {type(model).__name__}: {missing[:10]}")
        for name in missing:
            _log.warning("load_sharded: %s is missing from the checkpoint; left uninitialized", name)
    _init_lora(lora)


def _fill_4bit(layer, local, start, stop, ckpt, reader, quant, key, model_key, device) -> None:
    """This rank's rows of a 4-bit weight (from a 4-bit checkpoint ``quant``, or quantized from
    the float ``key``) and the layer's whole quantization state."""
    size = local.element_size()
    if quant is not None:
        weight, p = quant
        state = ckpt.quant_state(weight, p).to(device)  # checked, sizes included
        if tuple(state.shape) != (layer.out_features, layer.in_features):
            raise FormatError(f"{ckpt.entries[weight].file}: {weight}: field 'shape' says a quantized {list(state.shape)} "
                              f"weight; the model's layer is [{layer.out_features}, {layer.in_features}]")
        _set_quant_state(layer, state, device)
        # The stored tensor is uint8 [(n+1)//2, 1]; param row i holds bytes [i*size, (i+1)*size).
        raw = reader.rows(weight, start * size, stop * size).reshape(-1)
        local.view(-1).copy_(raw.view(local.dtype) if local.dtype != torch.uint8 else raw)
        return
    if key is None:
        raise FormatError(f"{ckpt.directory}: the checkpoint has no weight for {model_key}")
    weight = ckpt.read(key)
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise FormatError(f"{ckpt.entries[key].file}: {key} has shape {list(weight.shape)}; the model expects "
                          f"[{layer.out_features}, {layer.in_features}]")
    from .functional import quantize

    packed, state = quantize(weight, layer.quant_type, layer.blocksize, layer.double_quant)
    del weight
    _set_quant_state(layer, state, device)
    raw = packed.reshape(-1)[start * size:stop * size]
    local.view(-1).copy_(raw.view(local.dtype) if local.dtype != torch.uint8 else raw)


def _init_lora(layers: dict[str, _LoraLayer]) -> None:
    """Initializes each adapter as add_lora would on one process (full size, global RNG) and
    keeps this rank's rows."""
    for layer in layers.values():
        real = (layer.lora_A, layer.lora_B)
        a, b = real[0].weight, real[1].weight
        try:
            layer.lora_A = nn.Linear(layer.in_features, layer.r, bias=False, dtype=a.dtype)
            layer.lora_B = nn.Linear(layer.r, layer.out_features, bias=False, dtype=b.dtype)
            layer.reset_lora_parameters()
            full = (layer.lora_A.weight.detach(), layer.lora_B.weight.detach())
        finally:
            layer.lora_A, layer.lora_B = real
        for param, value in zip((a, b), full):
            start, stop = _local_range(param)
            _local(param).copy_(value[start:stop])


# --------------------------------------------------------------------------------------------
# The training loop's view of the process group

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
            from .adapter import save_adapter as write

            return write(unwrap(model), directory, **kwargs)
        return save_adapter(model, directory, **kwargs)

    def load_adapter(self, model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
        if not self.active:
            from .adapter import load_adapter as read

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
