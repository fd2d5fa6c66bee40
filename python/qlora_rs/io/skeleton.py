"""Building a transformers model skeleton for loading: parameters on the meta device, target
linear layers replaced by :class:`~qlora_rs.Linear4bit`, and the helpers that fill it tensor by
tensor (shared by :func:`qlora_rs.io.loading.from_pretrained` and the sharded loader in
:mod:`qlora_rs.distributed.sharded_loading`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import FormatError, InvalidArgumentError
from ..nn.linear4bit import Linear4bit

__all__ = ["QuantOptions", "empty_parameters", "auto_class", "build_skeleton", "linear_targets"]


# --------------------------------------------------------------------------------------------
# Quantization options


@dataclass
class QuantOptions:
    """How linear layers are quantized (for a float checkpoint) or computed (for any)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: Optional[list[str]] = None


# --------------------------------------------------------------------------------------------
# Building the skeleton


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Within it, new modules get their parameters on the meta device while buffers (computed
    by the modules' own code: rotary frequencies, position ids) are real CPU tensors."""
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def auto_class(config: Any, model_class: Any = None) -> Any:
    """The class to build: ``model_class`` if given (a class, or the name of a transformers
    class such as ``"AutoModelForCausalLM"``/``"BertModel"``), else by ``config.architectures``:
    a causal LM class if it names one, the base model (``AutoModel``) for encoders such as BERT."""
    import transformers

    if model_class is not None:
        if isinstance(model_class, str):
            cls = getattr(transformers, model_class, None)
            if cls is None:
                raise InvalidArgumentError(f"from_pretrained: transformers has no class {model_class!r}")
            return cls
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return transformers.AutoModelForCausalLM
        if arch.endswith("Model"):
            return transformers.AutoModel
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def build_skeleton(config: Any, cls: Any, dtype: torch.dtype) -> nn.Module:
    """The model of ``cls`` for ``config`` with meta parameters, real buffers, in ``dtype``."""
    with empty_parameters():
        if hasattr(cls, "from_config"):
            return cls.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """``{tied parameter: its source}`` as transformers ties them."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        return dict(keys)
    return {}


def linear_targets(model: nn.Module, skip: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the modules :func:`from_pretrained` quantizes in a float checkpoint: every
    ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output embedding, tied ones and ``skip``
    entries (each a full name or a dotted suffix of one)."""
    from transformers.pytorch_utils import Conv1D

    tied = _tied_keys(model)
    tied_modules = {k.rsplit(".", 1)[0] for pair in tied.items() for k in pair}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    skip = ["lm_head"] if skip is None else list(skip)
    names = []
    for name, m in model.named_modules():
        if not (type(m) is nn.Linear or isinstance(m, Conv1D)):
            continue
        if m is out or name in tied_modules or any(name == s or name.endswith("." + s) for s in skip):
            continue
        names.append(name)
    return names


def _replace_with_linear4bit(model: nn.Module, name: str, opts: QuantOptions, weight_dtype: torch.dtype) -> Linear4bit:
    from transformers.pytorch_utils import Conv1D

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, Conv1D):
        in_features, out_features = old.weight.shape
    elif isinstance(old, nn.Linear):
        in_features, out_features = old.in_features, old.out_features
    else:
        raise FormatError(f"{name}: the checkpoint stores it 4-bit but the model has a {type(old).__name__} there, not a linear layer")
    layer = Linear4bit(
        in_features, out_features, bias=old.bias is not None, quant_type=opts.quant_type, blocksize=opts.blocksize,
        double_quant=opts.double_quant, compute_dtype=opts.compute_dtype, device="meta", dtype=weight_dtype,
    )
    if old.bias is not None:
        layer.bias = nn.Parameter(torch.empty(out_features, device="meta", dtype=old.bias.dtype))
    layer._qlora_name = name
    layer._qlora_transposed = isinstance(old, Conv1D)
    setattr(parent, attr, layer)
    return layer


# --------------------------------------------------------------------------------------------
# Filling


def _key_resolver(model_keys: set[str], prefix: str):
    """Maps a checkpoint key to a model key: as it is, with the base model's prefix added (a
    base-model checkpoint in a model with a head), or with it removed (the other way round)."""

    def resolve(key: str) -> Optional[str]:
        if key in model_keys:
            return key
        if prefix:
            if prefix + "." + key in model_keys:
                return prefix + "." + key
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_keys:
                return key[len(prefix) + 1:]
        return None

    return resolve


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    module = model.get_submodule(parent_name) if parent_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise FormatError(f"{name}: not a parameter or buffer of the model")


def _move_module(module: nn.Module, device: torch.device) -> None:
    """Moves the module's materialized tensors (not those still on meta) to ``device``."""
    module._apply(lambda t: t if t.device.type == "meta" or t.device == device else t.to(device), recurse=False)


def _list(names: Sequence[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _conversion_note(model: nn.Module) -> str:
    """A sentence for a missing- or unexpected-keys error: whether transformers converts this
    model's checkpoints as it loads them (transformers 5 stores, among others, MoE experts as one
    fused tensor per projection and splits or joins them on load and save), which this loader does
    not; else ``""``."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        conversions = extract_weight_conversions_for_model(model)
    except Exception:  # an older transformers, or a model it cannot look up
        return ""
    if not conversions:
        return ""
    return (f"; transformers converts {type(model).__name__} checkpoints as it loads them ({len(conversions)} "
            f"rule(s) of its conversion_mapping: fused MoE experts and renamed tensors are such cases), which "
            f"qlora-rs's loader does not do, so strict=False would leave the converted tensors uninitialized")
