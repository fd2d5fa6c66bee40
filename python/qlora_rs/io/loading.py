"""`from_pretrained`: a transformers model with 4-bit linear layers, loaded from a model directory
without ever holding the 16-bit model in memory.

The model is built from ``config.json`` with its parameters on the meta device (buffers such as
rotary ``inv_freq`` are computed for real by the model's own code), the target linear layers are
replaced by :class:`~qlora_rs.Linear4bit`, and the parameters are then filled one tensor at a
time from the safetensors file(s) (one file, or a sharded ``model.safetensors.index.json``).
Three kinds of checkpoint load the same way:

- converted by ``qlora-rs convert`` and (b) saved by transformers + bitsandbytes: the linear
  weights are stored 4-bit (``<name>.weight`` uint8 plus ``.absmax``, ``.quant_map``,
  ``.quant_state.bitsandbytes__nf4``, ... in bitsandbytes' layout) and are taken as they are;
- float (bf16/fp16/fp32): each linear weight is read, quantized by the Rust core and dropped.

Tensors are read with plain positioned reads into freshly allocated memory rather than through a
memory map, so the resident set really is the 4-bit model plus the one tensor being converted
(mapped file pages would count in the process's RSS until unmapped). bitsandbytes is not used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import _lib
from ..core.quant_state import QUANT_TYPES, dtype_name, parse_dtype
from ..errors import FormatError, InvalidArgumentError
from ..nn.linear4bit import Linear4bit
from .checkpoint import _IGNORED_EXTRA, _ST_DTYPES, CONFIG_FILE, SINGLE_FILE, Checkpoint
from .skeleton import (
    QuantOptions, _conversion_note, _key_resolver, _list, _move_module, _replace_with_linear4bit, _set_tensor, _tied_keys,
    auto_class, build_skeleton, linear_targets,
)

__all__ = ["load_local", "save_model", "parse_quant_options", "Footprint", "memory_footprint"]

_log = logging.getLogger("qlora_rs")

def parse_quant_options(quantization: Any, compute_dtype: Any) -> Optional[QuantOptions]:
    """From ``from_pretrained``'s argument: None or a quant type name (defaults), a dict
    (qlora_rs names or bitsandbytes' ``bnb_4bit_*`` names), a :class:`QloraConfig`, or
    ``False`` (returns None: no quantization)."""
    if quantization is False:
        return None
    if quantization is None or quantization is True:
        opts = QuantOptions()
    elif isinstance(quantization, str):
        if quantization not in QUANT_TYPES:
            raise InvalidArgumentError(
                f"from_pretrained: quantization={quantization!r} is not supported: expected one of "
                f"{', '.join(QUANT_TYPES)}, a dict, a QloraConfig, None or False"
            )
        opts = QuantOptions(quant_type=quantization)
    else:
        from .hf_quantizer import QloraConfig

        config = quantization if isinstance(quantization, QloraConfig) else None
        if config is None:
            if not isinstance(quantization, dict):
                raise InvalidArgumentError(
                    f"from_pretrained: quantization must be None, False, a quant type name, a dict or a QloraConfig; "
                    f"got {type(quantization).__name__}"
                )
            config = QloraConfig.from_dict(dict(quantization))
        opts = QuantOptions(config.quant_type, config.blocksize, config.double_quant, config.compute_dtype,
                   list(config.skip_modules) if config.skip_modules is not None else None)
    if compute_dtype is not None:
        opts.compute_dtype = parse_dtype(compute_dtype)
    if opts.quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"unsupported quant_type {opts.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    _lib.check_blocksize(int(opts.blocksize))
    return opts


# --------------------------------------------------------------------------------------------
# Loading


def load_local(
    path: Union[str, os.PathLike],
    quantization: Any = None,
    compute_dtype: Any = None,
    device: Union[str, torch.device] = "cpu",
    *,
    dtype: Any = None,
    model_class: Any = None,
    strict: bool = True,
    config: Any = None,
) -> nn.Module:
    """:func:`qlora_rs.from_pretrained` in this process (no device mesh): arguments and result as
    documented there."""
    from transformers import AutoConfig

    path = Path(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import CudaUnavailableError

        raise CudaUnavailableError("from_pretrained: device='cuda' but torch sees no CUDA device")
    if config is None:
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (from_pretrained needs a model directory)")
        config = AutoConfig.from_pretrained(str(path))
    ckpt = Checkpoint(path)
    with ckpt:
        return _load(ckpt, config, quantization, compute_dtype, device, dtype, model_class, strict)


def _file_of(ckpt: Checkpoint, key: str) -> str:
    return str(ckpt.entries[key].file)


def _checkpoint_options(ckpt: Checkpoint, quantized: dict[str, dict[str, str]]) -> tuple[str, int, bool]:
    """quant type, block size and double quantization of a 4-bit checkpoint (from its first
    weight's stored state; every weight carries its own, so mixed files still load)."""
    weight, parts = next(iter(quantized.items()))
    state = ckpt.quant_state(weight, parts)
    return state.quant_type, state.blocksize, state.nested


def _load(ckpt, config, quantization, compute_dtype, device, dtype, model_class, strict) -> nn.Module:
    quantized = ckpt.quantized_weights()
    opts = parse_quant_options(quantization, compute_dtype)
    if quantized:
        qt, bs, dq = _checkpoint_options(ckpt, quantized)
        if opts is None:
            raise InvalidArgumentError(
                f"from_pretrained: {ckpt.directory} is a 4-bit checkpoint ({qt}); quantization=False would need the "
                "float weights: load it quantized and use qlora_rs.merge / dequantize, or load the original checkpoint"
            )
        if quantization is not None and (opts.quant_type, opts.blocksize, opts.double_quant) != (qt, bs, dq):
            raise InvalidArgumentError(
                f"from_pretrained: {ckpt.directory} is already quantized ({qt}, blocksize {bs}, double_quant={dq}) "
                f"but quantization asks for {opts.quant_type}, blocksize {opts.blocksize}, double_quant={opts.double_quant}; "
                "re-quantizing 4-bit weights compounds the error: quantize the float checkpoint instead (or pass "
                "quantization=None to keep the stored format)"
            )
        opts.quant_type, opts.blocksize, opts.double_quant = qt, bs, dq
    compute = opts.compute_dtype if opts is not None else parse_dtype(compute_dtype or torch.bfloat16)
    param_dtype = parse_dtype(dtype) if dtype is not None else compute
    # The config must not send transformers to bitsandbytes: this model is built and filled here.
    if getattr(config, "quantization_config", None) is not None:
        config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    cls = auto_class(config, model_class)
    model = build_skeleton(config, cls, param_dtype)
    prefix = getattr(model, "base_model_prefix", "") or ""
    model_state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    resolve = _key_resolver(set(model_state), prefix)
    tied = _tied_keys(model)

    # Which modules become 4-bit.
    if quantized:
        targets = {}
        for weight in quantized:
            key = resolve(weight)
            if key is None:
                continue  # reported as unexpected below
            targets[key.rsplit(".", 1)[0]] = weight
    elif opts is not None:
        targets = {name: None for name in linear_targets(model, opts.skip_modules)}
    else:
        targets = {}
    layers: dict[str, Linear4bit] = {}
    for name in targets:
        weight_dtype = compute
        key = name + ".weight"
        if not quantized:
            src = next((k for k in ckpt.entries if resolve(k) == key), None)
            if src is not None and ckpt.entries[src].is_float:
                weight_dtype = _ST_DTYPES[ckpt.entries[src].dtype]
        layers[name] = _replace_with_linear4bit(model, name, opts, weight_dtype)

    # One unit per model tensor: plain tensors, or a 4-bit weight with its companions.
    companions = {k for parts in quantized.values() for k in parts.values()}
    units: list[tuple[int, str, str]] = []  # (file order, checkpoint key, model key)
    unexpected: list[str] = []
    file_rank = {f: i for i, f in enumerate(ckpt.files)}
    seen_model_keys: set[str] = set()
    for key, entry in ckpt.entries.items():
        if key in companions:
            continue
        target = resolve(key)
        if target is None:
            if not _IGNORED_EXTRA.search(key):
                unexpected.append(key)
            continue
        if target in tied:
            continue  # tied to its source below; transformers does the same
        if target in seen_model_keys:
            raise FormatError(f"{ckpt.directory}: two checkpoint tensors map to {target} (one is {key})")
        seen_model_keys.add(target)
        units.append((file_rank[entry.file] * (1 << 62) + entry.start, key, target))
    units.sort()
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ignore_unexpected)]
    if unexpected and strict:
        raise FormatError(
            f"{ckpt.directory}: the checkpoint has tensors that {type(model).__name__} does not have: {_list(unexpected)} "
            f"(pass model_class= to build another class, or strict=False to ignore them){_conversion_note(model)}"
        )

    for _, key, target in units:
        module_name, _, attr = target.rpartition(".")
        layer = layers.get(module_name)
        if layer is not None and attr == "weight":
            _fill_linear4bit(ckpt, layer, key, quantized.get(key), device)
            continue
        value = ckpt.read(key)
        ref = model_state[target]
        if tuple(value.shape) != tuple(ref.shape):
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} has shape {list(value.shape)}; {type(model).__name__} expects "
                f"{list(ref.shape)} for {target} (does config.json match the weights?)"
            )
        if value.is_floating_point() and ref.is_floating_point():
            value = value.to(ref.dtype)
        _set_tensor(model, target, value.to(device))
        del value

    # Tied parameters share their source; buffers the checkpoint lacks keep the model's values.
    if tied:
        model.tie_weights()
    for name, t in list(model.named_buffers()):
        if t.device != device and t.device.type != "meta":
            _set_tensor(model, name, t.to(device))
    missing = [n for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
               if p.device.type == "meta"]
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    missing = [k for k in missing if not any(re.search(p, k) for p in ignore_missing)]
    if missing:
        if strict:
            raise FormatError(
                f"{ckpt.directory}: the checkpoint lacks tensors of {type(model).__name__}: {_list(missing)} "
                f"(pass model_class= for the class the checkpoint was saved from, or strict=False to initialize them)"
                f"{_conversion_note(model)}"
            )
        _initialize_missing(model, missing, device)
        _log.warning("from_pretrained: initialized %d tensors missing from %s: %s%s", len(missing), ckpt.directory,
                     _list(missing), _conversion_note(model))
    if unexpected:
        _log.warning("from_pretrained: ignored %d checkpoint tensors unknown to %s: %s",
                     len(unexpected), type(model).__name__, _list(unexpected))
    model.eval()
    if layers:
        from .hf_quantizer import mark_loaded_in_4bit

        mark_loaded_in_4bit(model)
    model.qlora_rs_checkpoint = {
        "kind": "4bit" if quantized else "float",
        "path": str(ckpt.directory),
        "quantized_modules": sorted(layers),
        "quantization": None if opts is None else {
            "quant_type": opts.quant_type, "blocksize": opts.blocksize, "double_quant": opts.double_quant,
            "compute_dtype": dtype_name(opts.compute_dtype),
        },
    }
    if torch.device(device).type == "cpu":
        from ..nn.cpu_decode import prepare

        model.qlora_rs_cpu_decode = prepare(model)
    return model


def _fill_linear4bit(ckpt: Checkpoint, layer: Linear4bit, key: str, parts: Optional[dict[str, str]], device) -> None:
    weight = ckpt.read(key)
    if parts:
        try:
            layer.load_weight_(weight, {part: ckpt.read(k) for part, k in parts.items()}, key)
        except FormatError as e:  # names the tensor and the field already
            raise FormatError(f"{_file_of(ckpt, key)}: {e}") from None
        except (RuntimeError, ValueError) as e:
            raise FormatError(f"{_file_of(ckpt, key)}: {key}: {e}") from None
    else:
        if not weight.is_floating_point():
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} is {dtype_name(weight.dtype)} {list(weight.shape)} without quantization state; "
                "expected a float weight or a 4-bit one with .absmax/.quant_map/.quant_state entries"
            )
        if getattr(layer, "_qlora_transposed", False):
            weight = weight.t()
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} has shape {list(weight.shape)}; the model expects "
                f"[{layer.out_features}, {layer.in_features}]"
            )
        layer.quantize_weight_(weight.contiguous())
    del weight
    _move_module(layer, device)


def _initialize_missing(model: nn.Module, missing: list[str], device: torch.device) -> None:
    """Gives the missing tensors memory on ``device`` and lets transformers initialize their
    modules as it does for keys absent from a checkpoint."""
    owners = {}
    init = getattr(model, "_init_weights", None)
    for name in missing:
        parent_name, _, attr = name.rpartition(".")
        module = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Linear4bit):
            if attr == "weight":
                # Initialize in float as transformers would, then quantize.
                linear = nn.Linear(module.in_features, module.out_features, bias=False, dtype=module.weight_dtype)
                if callable(init):
                    with torch.no_grad():
                        init(linear)
                module.quantize_weight_(linear.weight.detach())
                _move_module(module, device)
            continue  # its quantization buffers come with the weight
        t = getattr(module, attr)
        _set_tensor(model, name, torch.empty_like(t, device=device))
        owners[id(module)] = module
    for module in owners.values():
        if callable(init):
            with torch.no_grad():
                init(module)


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass
class Footprint:
    """Parameter count and memory of a model: as it is now, and were every parameter 16-bit."""

    params: int
    bytes_now: int
    bytes_16bit: int
    quantized_params: int
    #: Bytes of the 4-bit layers' weights: packed data plus quantization state.
    quantized_bytes: int = 0

    def __str__(self) -> str:
        return (f"{self.params / 1e6:.2f} M params: {self.bytes_now / 2**20:.1f} MiB as loaded vs "
                f"{self.bytes_16bit / 2**20:.1f} MiB in 16-bit ({self.quantized_params / 1e6:.2f} M params in 4 bits)")


def memory_footprint(model: nn.Module) -> Footprint:
    """Counts every parameter and buffer once (tied ones once); a 4-bit layer's weight counts as
    its logical ``out * in`` parameters and its packed bytes plus quantization state."""
    seen: set[int] = set()
    params = now = b16 = q = qbytes = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            n = module.in_features * module.out_features
            params += n
            q += n
            b16 += 2 * n
            seen.add(id(module.weight))
            now += module.weight.numel() * module.weight.element_size()
            qbytes += module.weight.numel() * module.weight.element_size() + sum(
                b.numel() * b.element_size() for b in module.buffers(recurse=False) if b is not None)
        for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            now += size
            if isinstance(p, nn.Parameter):
                params += p.numel()
                b16 += 2 * p.numel() if p.is_floating_point() else size
            elif not isinstance(module, Linear4bit):
                b16 += size
    return Footprint(params, now, b16, q, qbytes)


# --------------------------------------------------------------------------------------------
# Writing


_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.safetensors\.index\.json|"
                           r"\.bin\.index\.json)$")


def save_model(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    source_dir: Optional[Union[str, os.PathLike]] = None,
    quantization_config: Optional[dict] = None,
    force: bool = False,
) -> Path:
    """Writes ``model`` as a transformers model directory: ``model.safetensors`` (tied
    parameters once, as transformers saves them; 4-bit layers in bitsandbytes' layout),
    ``config.json`` (with ``quantization_config`` when given, without one otherwise) and the
    other files of ``source_dir`` (tokenizer, generation config; not its weights or config).

    The directory appears atomically: everything is written into a hidden sibling and renamed
    into place. An existing ``directory`` is replaced only with ``force``.
    """
    from safetensors.torch import save_file

    dst = Path(directory)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass force=True / --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tied = set(_tied_keys(model))
        tensors, seen = {}, {}
        for key, value in model.state_dict().items():
            if key in tied:
                continue
            value = value.detach().to("cpu").contiguous()
            ptr = value.untyped_storage().data_ptr() if value.numel() else None
            if ptr is not None and ptr in seen:
                value = value.clone()  # safetensors refuses two names for one memory
            seen[ptr] = key
            tensors[key] = value
        save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        if floats:
            config["dtype"] = dtype_name(max(set(floats), key=floats.count))
        config.pop("torch_dtype", None)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                if f.is_file() and f.name != CONFIG_FILE and not _WEIGHT_FILES.search(f.name):
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
