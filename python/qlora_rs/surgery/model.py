"""Model surgery: quantize the linear layers of a model, add LoRA adapters, prepare it for
training and merge the adapters back. Works on any ``nn.Module``; transformers models get their
output embedding skipped and their gradient-checkpointing switch used.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, LoraLinear4bit, _LoraLayer
from ..nn.merge import MergeError, MergeRoundingWarning, RequantizedMerge

__all__ = [
    "quantize_model",
    "add_lora",
    "prepare_for_training",
    "merge",
    "LoraSummary",
    "MergeError",
    "MergeRoundingWarning",
    "RequantizedMerge",
    "lora_layers",
]

_log = logging.getLogger("qlora_rs")

# Set on a model by add_lora; read by save_adapter.
ADAPTER_CONFIG_ATTR = "qlora_rs_adapter_config"


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _name_matches(name: str, key: str) -> bool:
    # PEFT's rule for a list entry: the full name, or its dotted suffix.
    return name == key or name.endswith("." + key)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out}


def _inside_lora(name: str, lora_names: Iterable[str]) -> bool:
    return any(name.startswith(p + ".") for p in lora_names)


def quantize_model(
    model: nn.Module,
    skip: Sequence[str] = ("lm_head",),
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Any = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
    calibration: Any = None,
) -> nn.Module:
    """Replaces the ``nn.Linear`` layers of ``model`` in place by :class:`Linear4bit`.

    One layer at a time: the full-precision weight of a layer is released as soon as its 4-bit
    copy replaces it, so the peak is one layer's weights above the quantized model. Layers whose
    name (or a dotted suffix of it) is in ``skip`` stay as they are, as do layers inside LoRA
    wrappers and layers whose weight is shared with another module (tied embeddings).

    ``calibration`` (a :class:`qlora_rs.io.calibrate.Calibration`, or a ``LongTensor [sequences,
    seq_len]`` of token ids) chooses the 4-bit codes of the decoder blocks' layers to minimise their
    output error on that data instead of rounding to nearest (see :mod:`qlora_rs.io.calibrate`); the
    record goes to ``model.config.qlora_rs_calibration``, so a saved model carries it.
    Returns ``model``.
    """
    if isinstance(skip, str):
        skip = (skip,)
    lora_names = [n for n, m in model.named_modules() if isinstance(m, _LoraLayer)]
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and not _inside_lora(n, lora_names) and not any(_name_matches(n, s) for s in skip)
    ]
    calibrated = {}
    if calibration is not None:
        from ..io.calibrate import calibrate_quantize_targets

        calibrated = calibrate_quantize_targets(model, calibration, [n for n in names if owners.get(id(
            getattr(*_parent_and_attr(model, n)).weight), 0) <= 1], quant_type, blocksize, double_quant)
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        linear = getattr(parent, attr)
        if owners.get(id(linear.weight), 0) > 1:
            _log.info("quantize_model: %s shares its weight with another module (tied); left unquantized", name)
            continue
        if name + ".weight" in calibrated:
            layer = calibrated[name + ".weight"].linear4bit(linear, compute_dtype=compute_dtype,
                                                            quant_storage=quant_storage)
        else:
            layer = Linear4bit.from_linear(
                linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                compute_dtype=compute_dtype, quant_storage=quant_storage,
            )
        layer._qlora_name = name
        setattr(parent, attr, layer)
        del linear
    if any(isinstance(m, Linear4bit) for m in model.modules()) and hasattr(model, "config"):
        from ..io.hf_quantizer import mark_loaded_in_4bit  # a transformers model: tell PEFT, TRL, the Trainer

        mark_loaded_in_4bit(model)
    return model


@dataclass
class LoraSummary:
    """What :func:`add_lora` did: the wrapped layers and the parameter counts (4-bit weights
    count as their logical number of parameters)."""

    modules: list[str]
    trainable: int
    total: int
    config: dict = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f} "
            f"|| LoRA layers: {len(self.modules)}"
        )


def _logical_numel(model: nn.Module) -> int:
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += m.in_features * m.out_features if isinstance(m, Linear4bit) and name == "weight" else p.numel()
    return total


def _linear_names(model: nn.Module) -> list[str]:
    lora_names = [n for n, m in model.named_modules() if isinstance(m, _LoraLayer)]
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _inside_lora(n, lora_names)
    ]


def _select_targets(model: nn.Module, target_modules: Union[str, Sequence[str]], linear: list[str]) -> list[str]:
    def available() -> str:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        return f"available linear layers: {', '.join(short) or '(none)'} (full names, e.g. {', '.join(linear[:4])})"

    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            outputs = _output_embedding_names(model)
            chosen = [n for n in linear if n not in outputs and not n.endswith("lm_head")]
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as e:
                raise InvalidArgumentError(f"add_lora: target_modules {target_modules!r} is not a valid regex ({e})") from None
            chosen = [n for n in linear if pattern.fullmatch(n)]
        if not chosen:
            raise InvalidArgumentError(f"add_lora: target_modules {target_modules!r} matches no linear layer; {available()}")
        return chosen
    keys = list(target_modules)
    if not keys:
        raise InvalidArgumentError(f"add_lora: target_modules is empty; {available()}")
    unmatched = [k for k in keys if not any(_name_matches(n, k) for n in linear)]
    if unmatched:
        raise InvalidArgumentError(f"add_lora: target(s) {unmatched} match no linear layer; {available()}")
    return [n for n in linear if any(_name_matches(n, k) for k in keys)]


def _config_targets(target_modules: Union[str, Sequence[str]], chosen: list[str], linear: list[str]) -> Union[str, list[str]]:
    """The ``target_modules`` to record: a regex or list as given; for "all-linear", the short
    names when they select exactly the chosen layers (PEFT's suffix rule), else the full names."""
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        return target_modules
    if not isinstance(target_modules, str):
        return list(target_modules)
    short = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if {n for n in linear if any(_name_matches(n, s) for s in short)} == set(chosen):
        return short
    return sorted(chosen)


def add_lora(
    model: nn.Module,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    use_rslora: bool = False,
    *,
    init: Union[str, bool] = "default",
    lora_dtype: Any = torch.float32,
) -> LoraSummary:
    """Wraps the target linear layers of ``model`` in LoRA adapters (:class:`LoraLinear4bit` for
    :class:`Linear4bit`, :class:`LoraLinear` for ``nn.Linear``) and freezes every other parameter.

    ``target_modules``: ``"all-linear"`` (every linear layer but the output embedding /
    ``lm_head``), a list of names (each matching a full module name or its dotted suffix, like
    ``"q_proj"``; every entry must match something) or a regex matched against full names.
    Returns a :class:`LoraSummary`; the configuration is kept on the model for :func:`save_adapter`.
    """
    linear = _linear_names(model)
    chosen = _select_targets(model, target_modules, linear)
    wrap_layers(model, chosen, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, lora_dtype=lora_dtype)
    config = {
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "target_modules": _config_targets(target_modules, chosen, linear),
        "use_rslora": bool(use_rslora),
    }
    existing = getattr(model, ADAPTER_CONFIG_ATTR, None)
    if existing is not None and any(existing.get(k) != config.get(k) for k in ("r", "lora_alpha", "use_rslora")):
        _log.warning("add_lora: the model already had adapters with another r/alpha; save_adapter records the latest")
    try:
        setattr(model, ADAPTER_CONFIG_ATTR, config)
    except AttributeError:
        pass
    return lora_summary(model, config)


def wrap_layers(
    model: nn.Module,
    names: Iterable[str],
    *,
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    init: Union[str, bool] = "default",
    lora_dtype: Any = torch.float32,
) -> None:
    """Wraps the named linear layers in LoRA layers and freezes every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise InvalidArgumentError(f"{name} is a {type(base).__name__}, not a linear layer; LoRA wraps linear layers")
        cls = LoraLinear4bit if isinstance(base, Linear4bit) else LoraLinear
        if getattr(base, "_qlora_name", None) is None:
            base._qlora_name = name
        layer = cls(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, lora_dtype=lora_dtype)
        setattr(parent, attr, layer.train(base.training))  # an eval model's new layers do not drop out


def lora_layers(model: nn.Module) -> dict[str, _LoraLayer]:
    """The LoRA layers of a model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoraLayer)}


def lora_summary(model: nn.Module, config: Optional[dict] = None) -> LoraSummary:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoraSummary(
        modules=list(lora_layers(model)), trainable=trainable, total=_logical_numel(model),
        config=dict(config or getattr(model, ADAPTER_CONFIG_ATTR, {}) or {}),
    )


def prepare_for_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    *,
    fp32_norms: bool = False,
    gradient_checkpointing_kwargs: Optional[dict] = None,
) -> nn.Module:
    """What PEFT's ``prepare_model_for_kbit_training`` does, for a model quantized by
    :func:`quantize_model`: freezes the base parameters (LoRA layers added afterwards are
    trainable), and with ``gradient_checkpointing`` makes the input embeddings' output require
    grad (so checkpointed blocks get gradients with a frozen embedding) and switches checkpointing
    on (``use_reentrant=False`` unless ``gradient_checkpointing_kwargs`` says otherwise).
    ``fp32_norms`` keeps normalization layers' weights in float32 for stability.
    Returns ``model``.
    """
    lora_params = {id(p) for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        if id(p) not in lora_params:
            p.requires_grad_(False)
    if fp32_norms:
        for name, m in model.named_modules():
            if "norm" in type(m).__name__.lower():
                for p in m.parameters(recurse=False):
                    if p.is_floating_point():
                        p.data = p.data.float()
    if gradient_checkpointing:
        if not callable(getattr(model, "gradient_checkpointing_enable", None)):
            raise InvalidArgumentError(
                f"prepare_for_training: {type(model).__name__} has no gradient_checkpointing_enable() (not a "
                "transformers model); pass gradient_checkpointing=False and wrap blocks in torch.utils.checkpoint yourself"
            )
        make_grads = getattr(model, "enable_input_require_grads", None)
        if callable(make_grads):
            make_grads()
        else:
            get_emb = getattr(model, "get_input_embeddings", None)
            emb = get_emb() if callable(get_emb) else None
            if emb is not None:
                emb.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        enable_checkpointing(model, kwargs)
    return model


def enable_checkpointing(model: nn.Module, kwargs: Optional[dict] = None) -> None:
    """Switches on a transformers model's gradient (activation) checkpointing with ``kwargs``
    (default: non-reentrant). transformers 5.2x names it ``activation_checkpointing_enable`` and
    warns on the old name; 5.17 has only the old one."""
    kwargs = {"use_reentrant": False} if kwargs is None else kwargs
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def merge(model: nn.Module, requantize: bool = False) -> dict[str, MergeError]:
    """Folds every LoRA adapter into its base weight, in place.

    Each LoRA layer becomes a plain ``nn.Linear`` holding ``W + B @ A * scaling`` in the dtype of
    the model's other weights (its embeddings, norms: bf16 for a model loaded in bf16), so the merged
    model runs as it is; or with ``requantize`` a
    :class:`Linear4bit` with the base's quantization options. Returns the merge error per layer
    (:class:`MergeError`); the rounding to bf16 or 4 bits is the only loss. Re-quantizing can
    round small adapters away: it warns (:class:`MergeRoundingWarning`) with the change measured.
    """
    report, rounding = merge_layers(model, requantize)
    if rounding.layers:
        rounding.warn("Merging into 16-bit weights (without requantize=True) rounds far more finely")
    return report


def _plain_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype holding most of the model's floating parameters outside 4-bit and LoRA layers."""
    skip = {id(p) for m in model.modules() if isinstance(m, (Linear4bit, _LoraLayer)) for p in m.parameters()}
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def merge_layers(model: nn.Module, requantize: bool) -> tuple[dict[str, MergeError], RequantizedMerge]:
    """:func:`merge` without the warning: returns the report and what re-quantizing did."""
    report: dict[str, MergeError] = {}
    rounding = RequantizedMerge()
    model_dtype = _plain_float_dtype(model)
    for name, layer in list(lora_layers(model).items()):
        base = layer.base_layer
        with torch.no_grad():
            if isinstance(base, Linear4bit):
                w = base.dequantize(torch.float32)
                dtype = base.weight_dtype if requantize or model_dtype is None else model_dtype
            else:
                w = base.weight.detach().float()
                dtype = base.weight.dtype
            delta = layer.delta_weight().to(w.device).float()
            exact = w + delta
            bias = base.bias
            if requantize and isinstance(base, Linear4bit):
                new = Linear4bit(
                    base.in_features, base.out_features, bias=False, quant_type=base.quant_type,
                    blocksize=base.blocksize, double_quant=base.double_quant, compute_dtype=base.compute_dtype,
                    quant_storage=base.quant_storage, device="meta", dtype=dtype,
                )
                new.quantize_weight_(exact.to(dtype))
                new._qlora_name = name
                stored = new.dequantize(torch.float32)
                rounding.add(w, delta, stored)
            else:
                new = nn.Linear(base.in_features, base.out_features, bias=False, device="meta", dtype=dtype)
                new.weight = nn.Parameter(exact.to(dtype), requires_grad=False)
                stored = new.weight.float()
            if bias is not None:
                new.bias = bias
            diff = stored - exact
            rms = exact.pow(2).mean().sqrt().item()
            report[name] = MergeError(
                max_abs=diff.abs().max().item() if diff.numel() else 0.0,
                relative_rms=(diff.pow(2).mean().sqrt().item() / rms) if rms > 0 else 0.0,
            )
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, new)
    if hasattr(model, ADAPTER_CONFIG_ATTR):
        try:
            delattr(model, ADAPTER_CONFIG_ATTR)
        except AttributeError:
            pass
    return report, rounding

