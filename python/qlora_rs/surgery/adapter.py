"""Save and load LoRA adapters in PEFT's on-disk layout, so that ``peft.PeftModel.from_pretrained``
reads what :func:`save_adapter` writes and :func:`load_adapter` reads what PEFT's
``save_pretrained`` writes:

- ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type`` ``"LORA"``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``use_rslora``, ``task_type``,
  ``base_model_name_or_path``, ...);
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` for every adapted layer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save

from ..errors import FormatError, InvalidArgumentError
from .model import ADAPTER_CONFIG_ATTR, _linear_names, _name_matches, lora_layers, wrap_layers

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file in the same folder and a rename,
    so a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _targets(model: torch.nn.Module, adapted: list[str]) -> list[str]:
    """Short names (``q_proj``) when, by PEFT's suffix rule, they select exactly the adapted
    layers; otherwise the full module names."""
    linear = set(_linear_names(model)) | set(adapted)  # an adapted layer is a LoRA wrapper, not an nn.Linear
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if {n for n in linear if any(_name_matches(n, s) for s in short)} == set(adapted):
        return short
    return sorted(adapted)


def _task_type(model: torch.nn.Module) -> Optional[str]:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return None


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def has_sharded_lora(model: torch.nn.Module) -> bool:
    """Whether any LoRA matrix is a distributed tensor (FSDP2 shards), which only a gather can save."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(getattr(layer, part).weight, DTensor)
               for layer in lora_layers(model).values() for part in ("lora_A", "lora_B"))


def save_adapter(
    model: torch.nn.Module,
    directory: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> Path:
    """Writes the model's LoRA adapters to ``directory`` in PEFT's layout (see the module
    docstring); returns the directory. Each file is written to a temporary file next to its
    destination, synced and renamed into place.

    This process writes what it holds: a DDP-wrapped model is unwrapped (it may be saved from rank
    0 alone); a model sharded with FSDP2 goes through :func:`qlora_rs.save_adapter`, which gathers
    the shards first (see :func:`has_sharded_lora`)."""
    model = unwrap_ddp(model)
    layers = lora_layers(model)
    if not layers:
        raise InvalidArgumentError("save_adapter: the model has no LoRA layers; call qlora_rs.add_lora first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.use_rslora) != (first.r, first.alpha, first.use_rslora):
            raise InvalidArgumentError(
                f"save_adapter: layer {name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora} but "
                f"others have r={first.r}, alpha={first.alpha}, use_rslora={first.use_rslora}; PEFT's rank_pattern / "
                "alpha_pattern are not supported"
            )
    recorded = getattr(model, ADAPTER_CONFIG_ATTR, None) or {}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None
        ) or None
    config: dict[str, Any] = {
        "task_type": task_type if task_type is not None else _task_type(model),
        "peft_type": "LORA",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "target_modules": _targets(model, list(layers)),
        "exclude_modules": None,
        "lora_alpha": first.alpha,
        "lora_dropout": float(recorded.get("lora_dropout", first.dropout)),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layer_replication": None,
        "lora_bias": False,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return out


_UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "fan_in_fan_out": False,
    "alora_invocation_tokens": None,
    "use_qalora": False,
}


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise FormatError(f"{path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; expected 'LORA'")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise FormatError(f"{path}: missing {key!r}")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, [], {}) and not (key == "bias" and value is None):
            raise FormatError(f"{path}: {key}={value!r} is not supported by qlora_rs (only plain LoRA: {key}={default!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise FormatError(f"{path}: {key} is not supported (every layer must share r and lora_alpha)")
    return config


def load_adapter(
    model: torch.nn.Module,
    directory: Union[str, os.PathLike],
    *,
    lora_dtype: Any = torch.float32,
) -> torch.nn.Module:
    """Loads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into
    ``model``: the layers named in the weights file are wrapped in LoRA layers (those already
    wrapped are reused) and get the stored matrices. Returns ``model``."""
    src = Path(directory)
    config = _read_config(src / CONFIG_NAME)
    weights_path = src / WEIGHTS_NAME
    if not weights_path.exists():
        if (src / "adapter_model.bin").exists():
            raise FormatError(f"{src}: only adapter_model.bin (pickle) found; qlora_rs reads {WEIGHTS_NAME}")
        raise FileNotFoundError(f"{weights_path}: no such file")
    weights = load_file(str(weights_path))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        path = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if path.endswith(suffix):
                    modules.setdefault(path[: -len(suffix)], {})[part] = value
                    break
            else:
                continue
            break
        else:
            raise FormatError(f"{weights_path}: unexpected tensor {key!r}; expected only ...lora_A.weight / ...lora_B.weight")
    incomplete = [m for m, parts in modules.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise FormatError(f"{weights_path}: layers {incomplete} lack lora_A or lora_B")
    r = int(config["r"])
    existing = lora_layers(model)
    names = dict(model.named_modules())
    missing = [m for m in modules if m not in names]
    if missing:
        linear = _linear_names(model)
        raise FormatError(
            f"{weights_path}: the adapter names layers this model lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(the model's linear layers include {linear[:5]})"
        )
    to_wrap = [m for m in modules if m not in existing]
    wrap_layers(
        model, to_wrap, r=r, alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)), init="default", lora_dtype=lora_dtype,
    )
    layers = lora_layers(model)
    with torch.no_grad():
        for name, parts in modules.items():
            layer = layers[name]
            for part in ("lora_A", "lora_B"):
                param = getattr(layer, part).weight
                if tuple(parts[part].shape) != tuple(param.shape):
                    raise FormatError(
                        f"{weights_path}: {name}.{part}.weight is {list(parts[part].shape)}; the layer needs "
                        f"{list(param.shape)} (r={layer.r})"
                    )
                param.copy_(parts[part])
    for layer in layers.values():
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.requires_grad_(True)
    try:
        setattr(model, ADAPTER_CONFIG_ATTR, {
            "r": r, "lora_alpha": config["lora_alpha"], "lora_dropout": float(config.get("lora_dropout", 0.0)),
            "target_modules": config.get("target_modules"), "use_rslora": bool(config.get("use_rslora", False)),
        })
    except AttributeError:
        pass
    return model
