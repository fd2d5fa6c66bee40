"""FSDP2 (``fully_shard``) with frozen 4-bit weights: :func:`shard_model`, the mixed-precision
check that keeps a float ``quant_storage`` from being converted, and the (optimizer) state-dict
helpers over ``torch.distributed.checkpoint.state_dict``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidArgumentError
from ..nn.linear4bit import Linear4bit
from ..core.quant_state import dtype_name
from .env import decoder_layers, default_mesh, _model_device_type, _require_process_group, unwrap


# Keys a Linear4bit adds next to "<layer>.weight" in its state dict (bitsandbytes' layout).
_COMPANION = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
              ".weight.quant_state.")


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


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
