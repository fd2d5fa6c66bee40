"""The memory budget of fine-tuning a causal language model, from its ``config.json`` alone: the
QLoRA paper's table (full 16-bit fine-tuning, 16-bit LoRA, QLoRA) for any transformers decoder,
before anything is downloaded or loaded (``qlora-rs plan``, :func:`plan`).

Counting (exact). The model is built from its config on the meta device (no memory) the way
:func:`qlora_rs.from_pretrained` builds it, its linear layers are replaced by meta
:class:`~qlora_rs.Linear4bit` layers by the same rule (every ``nn.Linear`` but the output head
and tied ones) and LoRA is added by :func:`qlora_rs.add_lora` itself, so the counts are the ones
the real model has:

- 16-bit weights: every parameter (tied ones once) in ``dtype`` plus the buffers;
- 4-bit weights, in memory: per quantized weight of ``n`` elements ``(n + 1) // 2`` packed bytes,
  one block scale per ``blocksize`` elements (uint8 with double quantization, float32 without),
  with double quantization one float32 second-level scale per 256 blocks and the 256-float
  nested map, the 16-float quant map, plus the tensors kept in 16 bits (embeddings, ``lm_head``,
  norms, biases) and the buffers;
- 4-bit weights, on disk (``checkpoint_bytes``): the tensors of the state dict a 4-bit
  checkpoint holds (what ``qlora-rs convert`` writes), which adds each weight's JSON
  quantization state and leaves out non-persistent buffers. The JSON holds the double
  quantization offset, whose printed length depends on its value: counted as 19 characters
  (the usual), so the figure is within a few bytes per quantized weight;
- LoRA: ``r * (in + out)`` parameters per adapted layer, in ``lora_dtype`` (float32 by default,
  as :func:`qlora_rs.add_lora` makes them), and as many gradient bytes;
- optimizer state, as the optimizers allocate it: ``adamw`` (``torch.optim.AdamW``: two states in
  the parameter's dtype), ``paged_adamw`` (two float32 states: 8 bytes per parameter, whatever the
  parameter dtype; the paper's ``paged_adamw_32bit``), ``paged_adamw_8bit`` (two uint8 states plus
  a float32 scale per 256 elements; parameters under 4096 elements keep float32 states). Paged
  states live in CUDA unified memory: they are counted in full (they are on the GPU during the
  step, as in the paper's figure), and ``fits_with_paging`` says whether the rest fits when the
  driver pages them out under the activation peak, which is how the paper fits 65B in 48 GB.

Activations (a model, validated by measurement). Per decoder layer and token, in training with
``dtype`` (``c`` bytes) compute, LoRA in ``lora_dtype`` (``l`` bytes), what autograd keeps, as
read from the saved tensors of transformers' Llama and qlora_rs' LoRA functions:

- each RMSNorm: its float32 input and the reciprocal RMS, ``4h + 4`` (LayerNorm: ``ch + 8``);
  with trainable norm weights (full fine-tuning) also the normalized input, ``ch``;
- the input of each trained linear layer, once per distinct input (q/k/v share one, gate/up
  share one): ``ch`` for q/k/v, ``ch`` for gate/up, ``ci`` for down; the attention output
  (the o_proj input) ``c * heads * head_dim`` is always kept (SDPA saves it);
- attention, SDPA (the default): the query ``c*heads*head_dim``, key and value ``c*kv_heads*head_dim``
  each (``c*heads*head_dim`` each with a padded batch: transformers then repeats the key/value
  heads and passes a mask, which SDPA converts to ``dtype`` and keeps per layer, ``c*seq`` per
  token), the float32 log-sum-exp ``4 * heads``; eager: query, repeated key and value, the
  float32 softmax and its ``dtype`` copy, ``(4 + c) * heads * seq``;
- gated MLP: gate output, up output and the activation's output, ``3ci`` (plain MLP: ``ci``);
- LoRA, per adapted layer: ``x @ A^T`` (``l*r``) and, with dropout, the boolean mask (``in`` bytes).

Once per step: the final norm, the rotary tables, the padding mask, and the logits of the loss:
``logits[:, :-1].float()`` and ``cross_entropy`` keep the float32 log-probabilities
``4 * N * vocab`` (``N = batch * (seq - 1)``), and the start of the backward holds two more such
tensors (the loss gradient and the log-softmax gradient): ``12 * N * vocab`` at that moment.

The peak: without gradient checkpointing, everything saved plus the larger of the logits peak
and one layer's transients (the float32 LoRA input copies, ``3l * in`` per token for the widest
adapted layer with dropout, its output, the dequantized weight ``c * out * in``, and the gradient
of the residual stream ``2ch``). With gradient checkpointing (transformers' non-reentrant
checkpointing of each decoder layer): one ``ch`` hidden state per layer, plus the larger of the
logits peak and one layer's recomputed activations with its transients.

Totals: weights + LoRA parameters + optimizer state + the larger of the activation peak and the
gradients with the optimizer step's temporaries. The activation peak comes at the start of the
backward (or in its first layers), before the gradients exist, and the gradients are complete
only once the activations are gone; measured, the peak is the larger of the two, not their sum.
For full fine-tuning the gradients win, and the total is the paper's weights + gradients +
states (the >780 GB for 65B).

Measurement (:func:`~qlora_rs.training.memory_measure.measure_training_step`). On the CPU torch has
no ``max_memory_allocated``; the measurement uses the CPU allocator's own accounting as the profiler receives it: with
``profile_memory=True`` c10's CPU allocator reports every allocation and free (pointer, size) to
the profiler. Replaying those events in time order, counting a free only when its allocation was
seen, gives the bytes allocated since the measurement began at every moment; its maximum is the
peak. Memory outside torch's allocator (oneDNN scratch space, Rust-side buffers) is not counted,
as ``torch.cuda.max_memory_allocated`` would not count it either.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import FormatError, InvalidArgumentError

__all__ = [
    "plan",
    "MemoryPlan",
    "ModelCounts",
    "count_model",
    "parse_bytes",
    "METHODS",
    "OPTIMIZERS",
    "ATTENTIONS",
]

#: The three ways of fine-tuning the paper compares.
METHODS = ("full_16bit", "lora_16bit", "qlora")
#: Optimizer names, as ``qlora-rs train --optimizer`` takes them.
OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "eager")
_PAGED = ("paged_adamw", "paged_adamw_8bit")

# The JSON quantization state prints the double-quantization offset with ~19 characters
# (the same estimate as convert's plan); the skeleton's state holds 0.0 (3 characters).
_OFFSET_REPR_EXTRA = 16

# Linear layers by the tensor they read, by their short name (transformers' spellings).
_READS_QKV = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "query", "key", "value"}
_READS_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj"}
_READS_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3", "fc_in", "dense_h_to_4h"}
_READS_MLP_MID = {"down_proj", "fc2", "w2", "c_proj", "fc_out", "dense_4h_to_h"}
_GATED = {"gate_proj", "gate_up_proj", "w1", "w3"}
_LAYER_NAME = re.compile(r"^(?P<prefix>.*?\.)?(?:layers|h|blocks|layer)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Model types whose training steps were measured against the activation model (within 11%).
_LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"}


def _dtype_bytes(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# Counting the model


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of the model as the plan sees it."""

    name: str
    layer: Optional[int]
    role: str  # "qkv", "attn_out", "mlp_in", "mlp_mid", "other"
    in_features: int
    out_features: int
    quantized: bool
    lora: bool


@dataclass(frozen=True)
class ModelCounts:
    """Exact counts of a model built from its config (meta device) for given options."""

    model_type: str
    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: Optional[int]
    tied_embeddings: bool
    #: Parameters, tied ones once (4-bit weights count their logical elements).
    params: int
    quantized_params: int
    lora_params: int
    lora_layers: int
    #: Bytes in memory: all parameters and buffers in 16 bits, and with the linears in 4 bits.
    bytes_16bit: int
    bytes_4bit: int
    #: Bytes of tensor data in a checkpoint (state dict; no non-persistent buffers).
    checkpoint_bytes_16bit: int
    checkpoint_bytes_4bit: int
    #: The 4-bit weights' parts in memory: packed, absmax, nested_absmax, quant maps; kept tensors.
    bytes_4bit_parts: dict
    lora_bytes: int
    #: Optimizer state bytes by optimizer name, for the LoRA parameters and for all parameters.
    optimizer_bytes_lora: dict
    optimizer_bytes_full: dict
    #: Bytes an optimizer step allocates while it runs, by optimizer name (LoRA / all parameters).
    optimizer_step_bytes_lora: dict
    optimizer_step_bytes_full: dict
    #: Bytes of the trainable parameters of full fine-tuning (their gradients take as much).
    trainable_bytes_full: int
    linears: tuple
    #: Norm modules inside one decoder layer: ("rms" | "layer", size) for each.
    layer_norms: tuple
    final_norm: Optional[str]
    gated_mlp: bool
    notes: tuple = ()

    def layer_linears(self) -> dict:
        out: dict[int, list[LinearShape]] = {}
        for lin in self.linears:
            if lin.layer is not None:
                out.setdefault(lin.layer, []).append(lin)
        return out


def _load_config(config: Any) -> Any:
    """A transformers config from a model directory, a config.json path, a dict or a config."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, dict):
        return _config_from_dict(dict(config), "the config dict", InvalidArgumentError)
    path = Path(os.fspath(config))
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such file (give a model directory with config.json, or a config.json)")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{file}: holds a JSON {type(d).__name__}, not an object: not a transformers config.json")
    return _config_from_dict(d, str(file), FormatError)


def _config_from_dict(d: dict, where: str, error: type) -> Any:
    import transformers

    if not d.get("model_type"):
        raise error(f"{where}: no 'model_type' field; give the content of the model's config.json")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if d["model_type"] not in CONFIG_MAPPING:
        raise error(f"{where}: model_type {d['model_type']!r} is unknown to transformers {transformers.__version__}")
    # A 4-bit checkpoint's config: the plan says how to quantize, not the stored config.
    d.pop("quantization_config", None)
    try:
        return transformers.AutoConfig.for_model(**d)
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise error(f"{where}: transformers cannot build a config from it ({reason})") from None


def _norm_kind(module: Any) -> Optional[str]:
    name = type(module).__name__.lower()
    if "rmsnorm" in name:
        return "rms"
    if "layernorm" in name:
        return "layer"
    return None


def _role(rest: str) -> str:
    parent, _, short = rest.rpartition(".")
    in_attention = "attn" in parent or "attention" in parent
    in_mlp = "mlp" in parent or "feed_forward" in parent or "ffn" in parent
    if short in _READS_QKV and not in_mlp:
        return "qkv"
    if short in _READS_ATTN_OUT and in_attention:
        return "attn_out"
    if short in _READS_MLP_IN and not in_attention:
        return "mlp_in"
    if short in _READS_MLP_MID and (in_mlp or short != "c_proj"):
        return "mlp_mid"
    return "other"


def _state_bytes(optimizer: Any, params: Sequence[Any]) -> int:
    """Bytes of the state a paged optimizer allocates for ``params`` (its own layout rule: the
    state tensors of a device share one buffer, each aligned to 256 bytes)."""
    from ..optim.adamw import _ALIGN, _itemsize

    group = optimizer.param_groups[0]
    total = 0
    for p in params:
        for _, shape, dtype in optimizer._specs(p, group):
            total = -(-total // _ALIGN) * _ALIGN + shape.numel() * _itemsize(dtype)
    return total


def _optimizer_bytes(params: Sequence[Any]) -> dict:
    from ..optim import PagedAdamW, PagedAdamW8bit

    if not params:
        return {name: 0 for name in OPTIMIZERS}
    return {
        # torch.optim.AdamW: exp_avg and exp_avg_sq like the parameter.
        "adamw": sum(2 * p.numel() * p.element_size() for p in params),
        "paged_adamw": _state_bytes(PagedAdamW(params, paged=False), params),
        "paged_adamw_8bit": _state_bytes(PagedAdamW8bit(params, paged=False), params),
    }


def _optimizer_step_bytes(params: Sequence[Any]) -> dict:
    """Bytes an optimizer step allocates for the time of the step. The paged optimizers update
    one parameter at a time in float32: float32 copies of a 16-bit parameter and its gradient,
    the square root of the second moment and its quotient, and for 8-bit states both moments
    decoded; the largest parameter sets the peak. ``torch.optim.AdamW`` on a GPU runs its
    multi-tensor path, whose square root of the second moments is one state-sized temporary."""
    import torch

    def per_param(p: Any, eight_bit: bool) -> int:
        n = p.numel()
        copies = 0 if p.dtype == torch.float32 else 8 * n
        return copies + 8 * n + (8 * n if eight_bit and n >= 4096 else 0)

    if not params:
        return {name: 0 for name in OPTIMIZERS}
    return {
        "adamw": sum(p.numel() * p.element_size() for p in params),
        "paged_adamw": max(per_param(p, False) for p in params),
        "paged_adamw_8bit": max(per_param(p, True) for p in params),
    }


def _tensor_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def count_model(
    config: Any,
    *,
    r: int = 64,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: Any = "bfloat16",
    lora_dtype: Any = "float32",
) -> ModelCounts:
    """Builds the model of ``config`` on the meta device, quantizes and adapts it as
    :func:`qlora_rs.from_pretrained` and :func:`qlora_rs.add_lora` would, and counts (exactly)
    its parameters and bytes. Nothing is allocated but the buffers (rotary tables)."""
    from torch import nn

    from .. import _lib
    from ..io.loading import memory_footprint
    from ..io.skeleton import QuantOptions, _replace_with_linear4bit, auto_class, build_skeleton, linear_targets
    from ..surgery.model import add_lora
    from ..nn.linear4bit import Linear4bit
    from ..nn.lora import _LoraLayer
    from ..core.quant_state import QUANT_TYPES, parse_dtype

    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"plan: quant_type {quant_type!r} is not supported: expected one of {', '.join(QUANT_TYPES)}")
    _lib.check_blocksize(int(blocksize))
    if int(r) != r or r < 1:
        raise InvalidArgumentError(f"plan: r must be a positive integer, got {r!r}")
    dtype, lora_dtype = parse_dtype(dtype), parse_dtype(lora_dtype)
    cfg = _load_config(config)
    cls = auto_class(cfg)
    if not cls.__name__.endswith("ForCausalLM"):
        raise InvalidArgumentError(
            f"plan: {getattr(cfg, 'model_type', '?')} configs build a {cls.__name__}, not a causal language model; "
            "the plan covers causal LMs (a config with architectures [...ForCausalLM])"
        )
    model = build_skeleton(cfg, cls, dtype)
    arch = type(model).__name__

    foot16 = memory_footprint(model)
    params16 = [p for p in model.parameters()]
    trainable_bytes_full = _tensor_bytes(params16)
    ckpt16 = _tensor_bytes(model.state_dict(keep_vars=True).values())
    optimizer_full = _optimizer_bytes(params16)
    optimizer_step_full = _optimizer_step_bytes(params16)

    opts = QuantOptions(quant_type=quant_type, blocksize=int(blocksize), double_quant=bool(double_quant), compute_dtype=dtype)
    quantized = linear_targets(model, opts.skip_modules)
    for name in quantized:
        _replace_with_linear4bit(model, name, opts, dtype)
    foot4 = memory_footprint(model)
    parts = {"packed": 0, "absmax": 0, "nested_absmax": 0, "quant_maps": 0}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            parts["packed"] += m.weight.numel() * m.weight.element_size()
            parts["absmax"] += m.weight_absmax.numel() * m.weight_absmax.element_size()
            for buf, key in ((m.weight_nested_absmax, "nested_absmax"), (m.weight_quant_map, "quant_maps"),
                             (m.weight_nested_quant_map, "quant_maps")):
                if buf is not None:
                    parts[key] += buf.numel() * buf.element_size()
    parts["kept"] = foot4.bytes_now - sum(parts.values())
    ckpt4 = _tensor_bytes(model.state_dict(keep_vars=True).values())
    if double_quant:
        ckpt4 += _OFFSET_REPR_EXTRA * len(quantized)

    summary = add_lora(model, r=int(r), target_modules=target_modules, dropout=0.0, lora_dtype=lora_dtype)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = _tensor_bytes(lora_params)
    optimizer_lora = _optimizer_bytes(lora_params)
    optimizer_step_lora = _optimizer_step_bytes(lora_params)

    lora_names = set(summary.modules)
    quantized_names = set(quantized)
    linears = []
    for name, m in model.named_modules():
        if isinstance(m, (_LoraLayer, nn.Linear)) and name.rpartition(".")[0] not in lora_names:
            match = _LAYER_NAME.match(name)
            layer = int(match["index"]) if match else None
            linears.append(LinearShape(
                name=name, layer=layer, role=_role(match["rest"]) if match else "other",
                in_features=int(m.in_features), out_features=int(m.out_features),
                quantized=name in quantized_names, lora=name in lora_names,
            ))

    layer_norms: list[tuple[str, int]] = []
    final_norm = None
    hidden = int(cfg.hidden_size)
    for name, m in model.named_modules():
        kind = _norm_kind(m)
        if kind is None:
            continue
        weight = getattr(m, "weight", None)
        size = int(weight.numel()) if weight is not None else hidden
        match = _LAYER_NAME.match(name)
        if match is None:
            final_norm = kind
        elif int(match["index"]) == 0:
            layer_norms.append((kind, size))

    notes = []
    model_type = str(getattr(cfg, "model_type", "?"))
    if model_type not in _LLAMA_FAMILY:
        notes.append(f"activations follow the Llama-family model; not validated for model_type {model_type!r}")
    if any(lin.role == "other" and lin.layer is not None for lin in linears):
        notes.append("some linear layers have no known role: each is counted as keeping its own input")
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    mids = [lin.in_features for lin in linears if lin.role == "mlp_mid"]
    intermediate = max(mids) if mids else int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    shorts = {lin.name.rsplit(".", 1)[-1] for lin in linears if lin.layer is not None}
    return ModelCounts(
        model_type=model_type,
        architecture=arch,
        layers=int(cfg.num_hidden_layers),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(cfg.vocab_size),
        max_positions=getattr(cfg, "max_position_embeddings", None),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        params=foot4.params,
        quantized_params=foot4.quantized_params,
        lora_params=summary.trainable,
        lora_layers=len(summary.modules),
        bytes_16bit=foot16.bytes_now,
        bytes_4bit=foot4.bytes_now,
        checkpoint_bytes_16bit=ckpt16,
        checkpoint_bytes_4bit=ckpt4,
        bytes_4bit_parts=parts,
        lora_bytes=lora_bytes,
        optimizer_bytes_lora=optimizer_lora,
        optimizer_bytes_full=optimizer_full,
        optimizer_step_bytes_lora=optimizer_step_lora,
        optimizer_step_bytes_full=optimizer_step_full,
        trainable_bytes_full=trainable_bytes_full,
        linears=tuple(linears),
        layer_norms=tuple(layer_norms),
        final_norm=final_norm,
        gated_mlp=bool(shorts & _GATED),
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# The activation model


@dataclass(frozen=True)
class _Run:
    """The options the activation model depends on."""

    method: str
    batch: int
    seq: int
    r: int
    dtype_bytes: int
    lora_bytes: int
    matmul_bytes: int
    dropout: bool
    gradient_checkpointing: bool
    attention: str
    padding: bool


def _layer_saved_per_token(counts: ModelCounts, linears: list[LinearShape], run: _Run) -> int:
    """Bytes one decoder layer keeps for the backward, per token."""
    c, h = run.dtype_bytes, counts.hidden
    full = run.method == "full_16bit"
    q_dim = counts.heads * counts.head_dim
    kv_dim = counts.kv_heads * counts.head_dim
    total = 0
    for kind, size in counts.layer_norms:
        total += (4 * size + 4 + (c * size if full else 0)) if kind == "rms" else c * size + 8
    trained = [lin for lin in linears if full or lin.lora]
    roles = {lin.role for lin in trained}
    if "qkv" in roles:
        total += c * h
    if "mlp_in" in roles:
        total += c * h
    for lin in trained:
        if lin.role == "mlp_mid":
            total += c * lin.in_features
        elif lin.role == "other":
            total += c * lin.in_features
    if run.attention == "sdpa" or "attn_out" in roles:
        total += c * q_dim  # the attention output: SDPA keeps it; it is also the o_proj input
    if run.attention == "sdpa":
        total += c * q_dim + 2 * c * (q_dim if run.padding and kv_dim != q_dim else kv_dim) + 4 * counts.heads
        if run.padding:
            total += c * run.seq  # the mask, converted to dtype, kept per layer
    else:
        total += 3 * c * q_dim + (4 + c) * counts.heads * run.seq
    i = counts.intermediate
    total += (3 if counts.gated_mlp else 1) * c * i
    if not full:
        for lin in linears:
            if lin.lora:
                total += run.lora_bytes * run.r + (lin.in_features if run.dropout else 0)
    return total


def _layer_transient(linears: list[LinearShape], run: _Run, hidden: int, tokens: int) -> int:
    """Bytes one layer holds briefly on top of what it keeps: the gradient of the residual
    stream, and the most that one linear layer's backward holds at once. That backward runs in
    two phases whose temporaries are never alive together: the adapter's (its float32 input
    copies, dropout applied, and output gradient), then the base product's input gradient (the
    dequantized weight of a 4-bit layer, or a 16-bit weight cast when ``matmul_dtype`` differs;
    the product and its casts; the adapter's input gradient, kept to be added to it). One
    linear layer's temporaries are freed before the next one's are made."""
    c, l, m = run.dtype_bytes, run.lora_bytes, run.matmul_bytes
    most = 0
    for lin in linears:
        cast = m * (lin.in_features + lin.out_features) if m != c else 0
        if run.method == "full_16bit":
            most = max(most, (c * (lin.in_features + lin.out_features) + cast) * tokens)
            continue
        if lin.lora:
            copies = 3 * l * lin.in_features if run.dropout else (l * lin.in_features if l != c else 0)
            adapter = copies + l * lin.out_features
        else:
            adapter = c * lin.out_features
        weight = 0
        if (run.method == "qlora" and lin.quantized) or (run.method == "lora_16bit" and lin.lora and m != c):
            weight = m * lin.in_features * lin.out_features
        base = c * lin.in_features + cast + (c * lin.in_features if lin.lora else 0)
        most = max(most, adapter * tokens, base * tokens + weight)
    return most + 2 * c * hidden * tokens


def _activation_parts(counts: ModelCounts, run: _Run) -> dict:
    """The activation peak and its parts, in bytes."""
    b, s = run.batch, run.seq
    tokens = b * s
    n_loss = b * max(s - 1, 0)
    c, h = run.dtype_bytes, counts.hidden
    by_layer = counts.layer_linears()
    saved = {k: _layer_saved_per_token(counts, lins, run) for k, lins in by_layer.items()}
    layers = max(counts.layers, len(by_layer))
    if len(saved) < layers:  # layers without linear layers of their own (unusual): like layer 0
        first = saved.get(0, 0)
        saved.update({k: first for k in range(layers) if k not in saved})
    first_norm = 0
    if counts.layer_norms and counts.layer_norms[0][0] == "rms" and run.method != "full_16bit" \
            and not run.gradient_checkpointing:
        # Layer 0's input norm reads the frozen embedding's output: nothing needs its gradient.
        first_norm = 4 * counts.layer_norms[0][1] + 4
    transient = max((_layer_transient(lins, run, h, tokens) for lins in by_layer.values()), default=0)

    once = 0
    if counts.final_norm == "rms":
        once += (4 * h + 4 + (c * h if run.method == "full_16bit" else 0)) * tokens
    elif counts.final_norm == "layer":
        once += (c * h + 8) * tokens
    if run.method == "full_16bit":
        once += c * h * tokens  # the lm_head input
    once += 2 * c * counts.head_dim * s  # rotary cos/sin
    once += 8 * n_loss  # the labels
    if run.padding:
        once += b * s * s  # the boolean 4-D mask
    logits_saved = 4 * n_loss * counts.vocab
    logits_peak = 3 * logits_saved

    if run.gradient_checkpointing:
        kept = layers * c * h * tokens
        layer_peak = max(saved.values(), default=0) * tokens + transient
        peak = kept + once + max(logits_peak, layer_peak)
    else:
        kept = sum(saved.values()) * tokens - first_norm * tokens
        layer_peak = transient
        peak = kept + once + max(logits_peak, layer_peak)
    return {
        "layers": kept,
        "layer_recompute": (max(saved.values(), default=0) * tokens) if run.gradient_checkpointing else 0,
        "transient": transient,
        "logits": logits_peak,
        "other": once,
        "peak": peak,
    }


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """The memory budget of fine-tuning one model three ways (see the module docstring).

    Every ``*_bytes`` field maps each of :data:`METHODS` to bytes (GPU memory at the peak of a
    training step, except ``checkpoint_bytes``: tensor data on disk)."""

    counts: ModelCounts
    options: dict
    weights_bytes: dict
    checkpoint_bytes: dict
    lora_bytes: dict
    gradient_bytes: dict
    optimizer_bytes: dict
    optimizer_step_bytes: dict
    activation_bytes: dict
    activation_parts: dict
    total_bytes: dict
    gpu_bytes: Optional[int] = None
    fits: Optional[dict] = None
    fits_with_paging: Optional[dict] = None
    max_batch: Optional[dict] = None
    max_seq: Optional[dict] = None
    notes: list = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.counts.params

    @property
    def lora_params(self) -> int:
        return self.counts.lora_params

    def to_dict(self) -> dict:
        """A JSON-ready dict (``qlora-rs plan --json``)."""
        c = self.counts
        d: dict[str, Any] = {
            "model": {
                "model_type": c.model_type, "architecture": c.architecture, "layers": c.layers, "hidden": c.hidden,
                "intermediate": c.intermediate, "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
                "vocab": c.vocab, "tied_embeddings": c.tied_embeddings,
            },
            "options": dict(self.options),
            "params": c.params,
            "quantized_params": c.quantized_params,
            "lora_params": c.lora_params,
            "lora_layers": c.lora_layers,
            "weights_bytes": dict(self.weights_bytes),
            "weights_parts_bytes": {"qlora": dict(c.bytes_4bit_parts)},
            "checkpoint_bytes": dict(self.checkpoint_bytes),
            "lora_bytes": dict(self.lora_bytes),
            "gradient_bytes": dict(self.gradient_bytes),
            "optimizer_bytes": dict(self.optimizer_bytes),
            "optimizer_step_bytes": dict(self.optimizer_step_bytes),
            "optimizer_paged": self.options["optimizer"] in _PAGED,
            "activation_bytes": dict(self.activation_bytes),
            "activation_parts_bytes": {k: dict(v) for k, v in self.activation_parts.items()},
            "total_bytes": dict(self.total_bytes),
            "notes": list(self.notes),
        }
        if self.gpu_bytes is not None:
            d.update(gpu_bytes=self.gpu_bytes, fits=dict(self.fits), max_batch=dict(self.max_batch),
                     max_seq=dict(self.max_seq))
            if self.fits_with_paging is not None:
                d["fits_with_paging"] = dict(self.fits_with_paging)
        return d


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: Union[str, int, float]) -> int:
    """``"24GB"`` -> 24e9, ``"80GiB"`` -> 80 * 2**30, ``"500 MB"``; units B, kB, MB, GB, TB
    (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), case-insensitive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise InvalidArgumentError(f"a memory size must be positive, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise InvalidArgumentError(
            f"memory size {text!r} is not understood: expected a number with a unit, e.g. 24GB, 80GiB, 500MB "
            "(units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = float(m[1]) * _UNITS[m[2].lower()]
    if value <= 0:
        raise InvalidArgumentError(f"memory size {text!r} must be positive")
    return int(value)


def _check_options(optimizer: str, attention: str, seq: int, batch: int, lora_dropout: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise InvalidArgumentError(f"plan: optimizer {optimizer!r} is not supported: expected one of {', '.join(OPTIMIZERS)}")
    if attention not in ATTENTIONS:
        raise InvalidArgumentError(f"plan: attention {attention!r} is not supported: expected one of {', '.join(ATTENTIONS)}")
    for name, value in (("seq", seq), ("batch", batch)):
        if int(value) != value or value < 1:
            raise InvalidArgumentError(f"plan: {name} must be a positive integer, got {value!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise InvalidArgumentError(f"plan: lora_dropout must be in [0, 1), got {lora_dropout!r}")


def _budget(counts: ModelCounts, method: str, run: _Run, optimizer: str) -> dict:
    if method == "qlora":
        weights = counts.bytes_4bit
    else:
        weights = counts.bytes_16bit
    if method == "full_16bit":
        lora, grads, opt = 0, counts.trainable_bytes_full, counts.optimizer_bytes_full[optimizer]
        step = counts.optimizer_step_bytes_full[optimizer]
    else:
        lora, grads, opt = counts.lora_bytes, counts.lora_bytes, counts.optimizer_bytes_lora[optimizer]
        step = counts.optimizer_step_bytes_lora[optimizer]
    parts = _activation_parts(counts, run)
    # The activation peak comes before the gradients exist (the start of the backward, or its
    # first layers); the gradients are complete once the activations are gone (the step).
    peak = max(parts["peak"], grads + step)
    return {"weights": weights, "lora": lora, "gradients": grads, "optimizer": opt, "optimizer_step": step,
            "activations": parts["peak"], "parts": parts, "total": weights + lora + opt + peak}


def _largest(fits: Any, start: int, cap: int) -> int:
    """The largest n in [1, cap] with fits(n) (fits is monotone), 0 if none."""
    if not fits(start if start <= cap else cap):
        lo, hi = 0, min(start, cap)
    else:
        lo = min(start, cap)
        hi = lo
        while hi < cap:
            hi = min(2 * hi, cap)
            if not fits(hi):
                break
            lo = hi
        if lo == cap:
            return cap
    # Invariant: fits(lo) (or lo == 0), not fits(hi).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan(
    config: Any,
    *,
    r: int = 64,
    seq: int = 512,
    batch: int = 1,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    optimizer: str = "paged_adamw",
    gradient_checkpointing: bool = True,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: Any = "bfloat16",
    lora_dtype: Any = "float32",
    lora_dropout: float = 0.05,
    attention: str = "sdpa",
    padding: bool = True,
    gpu: Union[str, int, None] = None,
    matmul_dtype: Any = None,
    counts: Optional[ModelCounts] = None,
) -> MemoryPlan:
    """The memory budget of fine-tuning the causal LM of ``config`` (a model directory, a
    config.json path, a config dict or a transformers config), before anything is loaded.

    ``r``, ``target_modules`` (as :func:`qlora_rs.add_lora` takes them), ``lora_dtype`` and
    ``lora_dropout``: the adapters. ``seq`` and ``batch``: tokens per example and examples per
    step. ``optimizer``: one of :data:`OPTIMIZERS`. ``quant_type``, ``blocksize``,
    ``double_quant``: the 4-bit format. ``dtype``: the 16-bit weights and the compute.
    ``attention``: transformers' ``sdpa`` (its default) or ``eager``. ``padding``: batches padded
    to their longest example (what ``qlora-rs train`` does; transformers then passes SDPA a mask).
    ``gpu`` (``"24GB"``, ``"80GiB"``, bytes): adds whether each method fits, the largest batch at
    ``seq`` and the largest sequence at ``batch`` that fit. ``matmul_dtype``: the dtype products
    run in (``dtype`` on GPUs; a CPU without bf16 matrix units runs them in float32).
    ``counts``: a :func:`count_model` result for the same model and options, to skip rebuilding it.
    """
    from ..core.quant_state import dtype_name, parse_dtype

    _check_options(optimizer, attention, seq, batch, lora_dropout)
    dtype, lora_dt = parse_dtype(dtype), parse_dtype(lora_dtype)
    mm = parse_dtype(matmul_dtype) if matmul_dtype is not None else dtype
    if counts is None:
        counts = count_model(config, r=r, target_modules=target_modules, quant_type=quant_type, blocksize=blocksize,
                             double_quant=double_quant, dtype=dtype, lora_dtype=lora_dt)
    gpu_bytes = parse_bytes(gpu) if gpu is not None else None

    def run_for(method: str, b: int, s: int) -> _Run:
        return _Run(method=method, batch=int(b), seq=int(s), r=int(r), dtype_bytes=_dtype_bytes(dtype),
                    lora_bytes=_dtype_bytes(lora_dt), matmul_bytes=_dtype_bytes(mm), dropout=float(lora_dropout) > 0,
                    gradient_checkpointing=bool(gradient_checkpointing), attention=attention, padding=bool(padding))

    budgets = {m: _budget(counts, m, run_for(m, batch, seq), optimizer) for m in METHODS}
    options = dict(r=int(r), seq=int(seq), batch=int(batch), target_modules=target_modules, optimizer=optimizer,
                   gradient_checkpointing=bool(gradient_checkpointing), quant_type=quant_type, blocksize=int(blocksize),
                   double_quant=bool(double_quant), dtype=dtype_name(dtype), lora_dtype=dtype_name(lora_dt),
                   lora_dropout=float(lora_dropout), attention=attention, padding=bool(padding))
    if not isinstance(target_modules, str):
        options["target_modules"] = list(target_modules)
    result = MemoryPlan(
        counts=counts,
        options=options,
        weights_bytes={m: budgets[m]["weights"] for m in METHODS},
        checkpoint_bytes={"full_16bit": counts.checkpoint_bytes_16bit, "lora_16bit": counts.checkpoint_bytes_16bit,
                          "qlora": counts.checkpoint_bytes_4bit},
        lora_bytes={m: budgets[m]["lora"] for m in METHODS},
        gradient_bytes={m: budgets[m]["gradients"] for m in METHODS},
        optimizer_bytes={m: budgets[m]["optimizer"] for m in METHODS},
        optimizer_step_bytes={m: budgets[m]["optimizer_step"] for m in METHODS},
        activation_bytes={m: budgets[m]["activations"] for m in METHODS},
        activation_parts={m: budgets[m]["parts"] for m in METHODS},
        total_bytes={m: budgets[m]["total"] for m in METHODS},
        notes=list(counts.notes),
    )
    if optimizer in _PAGED:
        result.notes.append("optimizer state is paged (CUDA unified memory): counted in full; the driver can move it "
                            "to host RAM under the activation peak (see fits_with_paging)")
    if gpu_bytes is not None:
        result.gpu_bytes = gpu_bytes
        result.fits = {m: result.total_bytes[m] <= gpu_bytes for m in METHODS}
        if optimizer in _PAGED:
            result.fits_with_paging = {m: result.total_bytes[m] - result.optimizer_bytes[m] <= gpu_bytes for m in METHODS}
        cap = int(counts.max_positions) if counts.max_positions else 1 << 20
        result.max_batch, result.max_seq = {}, {}
        for m in METHODS:
            result.max_batch[m] = _largest(
                lambda b, m=m: _budget(counts, m, run_for(m, b, seq), optimizer)["total"] <= gpu_bytes, int(batch), 1 << 20)
            result.max_seq[m] = _largest(
                lambda s, m=m: _budget(counts, m, run_for(m, batch, s), optimizer)["total"] <= gpu_bytes, int(seq), cap)
        if any(v == cap for v in result.max_seq.values()):
            result.notes.append(f"max_seq stops at the model's max_position_embeddings ({cap})")
    return result
