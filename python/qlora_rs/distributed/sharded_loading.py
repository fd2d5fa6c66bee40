"""``from_pretrained`` for N ranks (:func:`load_sharded`): each rank reads only its rows of the
checkpoint, a float checkpoint is quantized one layer at a time, and the model comes back
sharded with FSDP2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FormatError, InvalidArgumentError
from ..nn.linear4bit import Linear4bit
from ..nn.lora import _LoraLayer
from ..core.quant_state import QuantState, dtype_name, parse_dtype
from ..io.checkpoint import _IGNORED_EXTRA, _QUANT_SUFFIX, CONFIG_FILE, Checkpoint
from ..io.loading import _checkpoint_options, parse_quant_options
from ..io.skeleton import _conversion_note, _key_resolver, _list, _set_tensor, _tied_keys, auto_class, build_skeleton, linear_targets
from .adapters import _lora_layers
from .env import default_mesh, _require_process_group
from .fsdp import _local, _local_range, shard_model

_log = logging.getLogger("qlora_rs")


def _set_quant_state(layer: Linear4bit, state: QuantState, device: torch.device) -> None:
    """The layer's quantization buffers and options from ``state``; its (sharded) weight untouched."""
    if tuple(state.shape) != (layer.out_features, layer.in_features):
        raise FormatError(f"{layer._describe()}: the checkpoint's quantization state is for shape {list(state.shape)}")
    layer._set_quant_state(state, device)


class _RowReader:
    """The rows of checkpoint tensors this rank reads (through the one checkpoint reader)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.ckpt.read_rows(key, start, stop)

    def close(self) -> None:
        pass


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

    _require_process_group("load_sharded")
    path = Path(path)
    if mesh is None:
        mesh = default_mesh()
    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if config is None:
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (load_sharded needs a model directory)")
        config = AutoConfig.from_pretrained(str(path))
    with Checkpoint(path) as ckpt:
        quantized = ckpt.quantized_weights()
        opts = parse_quant_options(quantization, compute_dtype)
        if opts is None:
            raise InvalidArgumentError("load_sharded: quantization=False is not supported (it loads 4-bit models)")
        if quantized:
            qt, bs, dq = _checkpoint_options(ckpt, quantized)
            opts.quant_type, opts.blocksize, opts.double_quant = qt, bs, dq
        param_dtype = parse_dtype(dtype) if dtype is not None else opts.compute_dtype
        if getattr(config, "quantization_config", None) is not None:
            config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        model = build_skeleton(config, auto_class(config, model_class), param_dtype)
        prefix = getattr(model, "base_model_prefix", "") or ""
        resolve = _key_resolver(set(model.state_dict(keep_vars=True)), prefix)
        companions = {k for parts in quantized.values() for k in parts.values()}
        source = {}  # model key -> checkpoint key
        for key in ckpt.entries:
            target = None if key in companions else resolve(key)
            if target is not None:
                source.setdefault(target, key)
        # model key of a 4-bit weight -> (checkpoint key, {part: checkpoint key of its companion})
        quant_source = {resolve(w): (w, parts) for w, parts in quantized.items() if resolve(w) is not None}
        unexpected = [k for k in ckpt.entries if resolve(k) is None and not _QUANT_SUFFIX.match(k)
                      and not _IGNORED_EXTRA.search(k)]
        if unexpected and strict:
            raise FormatError(f"{ckpt.directory}: the checkpoint has tensors that {type(model).__name__} does not have: "
                              f"{_list(unexpected)} (pass strict=False to ignore them){_conversion_note(model)}")
        if quantized:
            targets = [k.rsplit(".", 1)[0] for k in quant_source]
        else:
            targets = linear_targets(model, opts.skip_modules)
        layers4: dict[str, Linear4bit] = {}
        for name in targets:
            layers4[name] = _meta_linear4bit(model, name, opts, quant_storage)
        if _tied_keys(model):
            model.tie_weights()
        if prepare is not None:
            prepare(model)
        shard_model(model, mesh, mp_policy=mp_policy, layers=layers(model) if layers is not None else None)
        kept = {n: b.to(device) for n, b in model.named_buffers() if b is not None and b.device.type != "meta"}
        model.to_empty(device=device)
        for n, b in kept.items():
            _set_tensor(model, n, b)
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
    from ..core.functional import quantize

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
