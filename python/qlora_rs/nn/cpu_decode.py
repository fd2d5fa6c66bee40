"""Generation on the CPU without PyTorch's per-op cost: what a decoder layer does besides its 4-bit
products, in fewer and cheaper calls.

At one token a step a small model's layer is mostly overhead. Measured on SmolLM2-135M (30 layers,
2 cores of a Zen 5), a token took ~15 ms, of which the 210 4-bit product calls took ~2.8 ms run
back to back on weights from memory; each RMS norm ran as eight torch ops (~18 us), each attention as SDPA's flash kernel built
for long sequences (~50 us for one query over ~60 cached positions), and each of the 210 products
paid a module call, a kernel call and a thread-team wake-up. :func:`prepare` (run by
:func:`qlora_rs.from_pretrained` for CPU models) changes six things, each only where it is exact
or checked:

- sibling projections that read the same input (q/k/v, gate/up) become a
  :class:`~qlora_rs.nn.linear4bit.ProjectionGroup`: one kernel call computes them all, each
  product the same bits as alone (:func:`group_projections`);
- RMS norms whose forward gives, on a probe, exactly what the Rust kernel gives in one of its two
  styles (transformers' ``LlamaRMSNorm`` and its copies in Mistral, Qwen2/3 and others; Gemma's
  ``1 + weight``) run that kernel on CPU inference (:func:`fast_rms_norms`);
- gated MLPs of 4-bit layers (SiLU, or Gemma's GELU with the tanh approximation) whose forward
  gives the fused call's bits on a probe run as one call (:func:`fused_mlps`), LoRA layers on the
  projections included (their shares added in the call as the layers add them);
- attention runs ``"qlora_rs_cpu"``, registered with transformers' attention interface: one
  query token per sequence on the CPU with no autograd is a Rust kernel (float32 softmax, as SDPA),
  everything else transformers' SDPA function itself (:func:`attention`);
- the attention modules of Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma3, Granite and SmolLM3
  (:data:`FAST_ATTENTION_CLASSES`) whose forward gives, on a probe, exactly what the same steps in
  fewer calls give take those steps for one token a step with a dynamic cache: the rotary
  embeddings of query and key in one Rust call (ten torch ops before), the attention kernel
  without the interface's lookup, the projections without their module calls, LoRA layers
  included (:func:`fast_attentions`);
- decoder layers of Llama's form or Gemma3's (:data:`FAST_DECODER_CLASSES`) whose parts all take
  those steps and whose forward gives, on a probe, what the steps give call the parts' steps
  themselves for one token a sequence, without the module calls, on what a plan gathered once
  holds and checks at every token, and what follows the attention (output projection, norms,
  MLP, residual sums) in one Rust call (:func:`fast_decoder_layers`).

Each falls back to the module's own code for anything else: training (autograd), other devices,
tracing, other dtypes. :func:`restore` undoes all six. Measured with ``benches/generate_bench.py``
(same machine, one run): 102.3 tokens/s against 78.6 with the products alone (77.9 against 65.4
before the attention modules' steps, in a slower hour); the decoder layers' steps then gave
1.08-1.09x (SmolLM2, two interleaved runs of 7 and 9 repeats: 139.2 against 128.3 tokens/s), and
1.20x with what follows the attention in one Rust call (145.2 against 121.2).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from .. import _lib
from ..core.ops import CpuPackedWeight, _capsule, _needs_graph, _no_modes, cpu_matmul_group
from .linear4bit import Linear4bit, ProjectionGroup, _untraced
from .lora import LORA_KERNEL_MAX_ROWS, LoraLinear4bit

__all__ = ["prepare", "restore", "group_projections", "fast_rms_norms", "fused_mlps", "attention", "fast_attentions",
           "fast_decoder_layers", "ATTENTION", "GATE_ACTIVATIONS", "RMS_NORM_KERNEL_MAX_ROWS", "FUSED_MLP_MAX_ROWS",
           "FAST_DECODER_CLASSES", "CpuDecode"]

#: Names of sibling layers that models call in this order on one input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))

#: The attention implementation :func:`prepare` gives a model (transformers' attention interface).
ATTENTION = "qlora_rs_cpu"


@dataclass
class CpuDecode:
    """What :func:`prepare` changed: projection groups, RMS norms, MLPs, the attention
    implementation it replaced (None: left as it was), attention modules that take the one-token
    steps, and decoder layers that call those steps themselves."""

    groups: int = 0
    norms: int = 0
    mlps: int = 0
    attention: Optional[str] = None
    attentions: int = 0
    layers: int = 0


def prepare(model: nn.Module) -> CpuDecode:
    """Makes ``model``'s CPU inference take the faster paths of this module (see there); returns
    what changed. Idempotent; nothing changes for training or on other devices."""
    done = CpuDecode(groups=len(group_projections(model)), norms=fast_rms_norms(model), mlps=fused_mlps(model))
    done.attention = attention(model)
    done.attentions = fast_attentions(model)
    done.layers = fast_decoder_layers(model)
    return done


def restore(model: nn.Module) -> None:
    """Undoes :func:`prepare`: every layer computes alone, the norms, MLPs and attention run their
    own code again."""
    for module in model.modules():
        group = module.__dict__.get("_cpu_group") if isinstance(module, Linear4bit) else None
        if group is not None:
            group.dissolve()
        if isinstance(module.__dict__.get("forward"), (_FastRMSNorm, _FastMLP, _FastAttention, _FastDecoderLayer)):
            del module.forward
    config = getattr(model, "config", None)
    previous = getattr(model, "_qlora_rs_attention", None)
    if config is not None and previous is not None and getattr(config, "_attn_implementation", None) == ATTENTION:
        _set_attention(model, previous)
        del model._qlora_rs_attention


def _base(module: Any) -> Any:
    """The Linear4bit under a LoRA wrapper (qlora_rs or PEFT), or the module itself."""
    return getattr(module, "base_layer", module)


def group_projections(model: nn.Module) -> list:
    """Groups the 4-bit siblings named in :data:`SIBLINGS` (same parent, same in_features and
    compute dtype, not yet grouped); returns the new groups."""
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [_base(getattr(parent, n, None)) for n in names]
            if not all(isinstance(layer, Linear4bit) for layer in layers):
                continue
            first = layers[0]
            if any(layer.in_features != first.in_features or layer.compute_dtype != first.compute_dtype
                   or layer.__dict__.get("_cpu_group") is not None for layer in layers):
                continue
            groups.append(ProjectionGroup(layers))
    return groups


#: Rows up to which an RMS norm runs the Rust kernel (one thread, a row at a time); more rows take
#: the module's own ops, vectorized and threaded. SmolLM2's 576-wide norm, bf16, 2-core Zen 5: the
#: kernel 2.48x torch's ops at 1 row, 1.25x at 8, 0.87x at 16, 0.30x at 128.
RMS_NORM_KERNEL_MAX_ROWS = 8

#: Rows up to which a gated MLP runs as one fused call: the call computes the activation one value
#: at a time (the C library's ``exp``/``tanh``, as close to torch's as a scalar gets), which torch's
#: vectorized op outruns from two rows on. SmolLM2's MLPs, bf16, weights from memory, 2-core Zen 5:
#: the fused call 1.08x the module's own forward (grouped gate/up products) at 1 row, 0.97x at 2,
#: 0.74x at 8, 0.62x at 64.
FUSED_MLP_MAX_ROWS = 1


class _FastRMSNorm:
    """The forward of an RMS norm module on CPU inference: the Rust kernel, in Llama's style or,
    with ``unit_offset``, Gemma's (``x_hat * (1 + weight)``); anything else: the module's own
    forward."""

    __slots__ = ("module", "unit_offset")

    def __init__(self, module: nn.Module, unit_offset: bool = False) -> None:
        self.module = module
        self.unit_offset = unit_offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        weight = module._parameters["weight"]  # not module.weight: Module.__getattr__ costs ~1 us
        if (type(x) is torch.Tensor and x.is_cpu and x.dtype == weight.dtype and weight.is_cpu and x.dim() > 0
                and x.shape[-1] == weight.shape[0] and x.numel() <= RMS_NORM_KERNEL_MAX_ROWS * weight.shape[0]
                and _untraced(x, weight)):
            return self.kernel(x, weight)
        return type(module).forward(module, x)

    def kernel(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The Rust kernel on checked ``x`` (rows of ``weight``'s length, its dtype, on the CPU)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        _lib.cpu_rms_norm(_capsule(x), _capsule(weight.detach()), _norm_eps(self.module), _capsule(out), self.unit_offset)
        return out


def _norm_eps(module: nn.Module) -> Optional[float]:
    """An RMS norm's epsilon: ``variance_epsilon`` (Llama and its copies) or ``eps`` (Gemma's)."""
    eps = module.__dict__.get("variance_epsilon", module.__dict__.get("eps"))
    return eps if isinstance(eps, float) else None


class _FastMLP:
    """The forward of a gated MLP (SiLU, or GELU with the tanh approximation: ``activation``) with
    4-bit projections on CPU inference, up to :data:`FUSED_MLP_MAX_ROWS` rows: one Rust call
    (:func:`qlora_rs._lib.cpu_gated_mlp_4bit`) instead of three layer calls and two ops, also with
    LoRA adapters on the projections (whose shares the call adds as the layers add them); anything
    else (hooks, other adapters, more rows, autograd): its own forward."""

    __slots__ = ("module", "activation")

    def __init__(self, module: nn.Module, activation: str = "silu") -> None:
        self.module = module
        self.activation = activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        layers = module._modules
        bases, adapters = _adapted((layers["gate_proj"], layers["up_proj"], layers["down_proj"]), x)
        if bases is not None:
            gate = bases[0]
            if (type(x) is torch.Tensor and x.is_cpu and x.dtype == gate.compute_dtype and x.dim() > 0
                    and x.shape[-1] == gate.in_features and x.numel() <= FUSED_MLP_MAX_ROWS * gate.in_features
                    and _untraced(x, None) and not _hooked(layers.values())):
                weights = tuple(layer._cpu_kernel_weight() for layer in bases)
                if None not in weights:
                    return _fused_mlp(weights, adapters, self.activation, x)
        return type(module).forward(module, x)


def _fused_mlp(weights: tuple, adapters: Optional[list], activation: str, x: torch.Tensor) -> torch.Tensor:
    """The fused MLP call on checked ``x`` (a CPU tensor of the projections' compute dtype, up to
    :data:`FUSED_MLP_MAX_ROWS` rows): ``weights`` the gate, up and down projections' kept weights,
    ``adapters`` their LoRA shares (:func:`_adapted`)."""
    x = x.contiguous()
    n_in, n_out = weights[0].shape[1], weights[2].shape[0]
    out = x.new_empty((*x.shape[:-1], n_out))
    m = x.numel() // n_in
    _lib.cpu_gated_mlp_4bit(*(w._packed_for(m, x.dtype) for w in weights), _capsule(x), _capsule(out), None, adapters,
                            activation)
    return out


def _adapted(layers, x) -> tuple:
    """``(bases, adapters)`` of projections that are plain 4-bit layers or qlora-rs LoRA layers
    around them whose shares a Rust call adds for ``x`` (:meth:`LoraLinear4bit._inference_share`);
    ``(None, None)`` if any is neither. Plain layers only (the usual case): ``(layers, None)``."""
    if all(type(layer) is Linear4bit for layer in layers):
        return layers, None
    bases, adapters = [], []
    k = layers[0].in_features
    rows = x.numel() // k if type(x) is torch.Tensor and k else LORA_KERNEL_MAX_ROWS + 1
    for layer in layers:
        if type(layer) is Linear4bit:
            bases.append(layer)
            adapters.append(None)
            continue
        share = layer._inference_share(rows) if type(layer) is LoraLinear4bit else None
        if share is None or type(layer.base_layer) is not Linear4bit:
            return None, None
        bases.append(layer.base_layer)
        adapters.append(share)
    return bases, adapters


#: The gate activations the fused call computes, each as the function whose values on a probe an
#: MLP's ``act_fn`` must give (``nn.SiLU``, transformers' ``SiLUActivation``; ``GELUTanh``,
#: ``nn.GELU(approximate="tanh")``).
GATE_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _activation_name(act: Any) -> Optional[str]:
    """The name in :data:`GATE_ACTIVATIONS` of the function ``act`` computes (the same values on a
    probe), or None."""
    if not callable(act):
        return None
    probe = torch.linspace(-8, 8, 33)
    for name, function in GATE_ACTIVATIONS.items():
        try:
            with torch.no_grad():
                if torch.equal(act(probe), function(probe)):
                    return name
        except Exception:
            return None
    return None


def _mlp_activation(module: nn.Module) -> Optional[str]:
    """The gate activation of a gated MLP of 4-bit projections without bias (plain or in qlora-rs
    LoRA layers) that the fused call can take, or None."""
    wrapped = [module._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(layer) in (Linear4bit, LoraLinear4bit) for layer in wrapped):
        return None
    layers = [_base(layer) for layer in wrapped]
    if not all(type(layer) is Linear4bit for layer in layers) or any(layer.bias is not None for layer in layers):
        return None
    gate, up, down = layers
    if not (up.in_features == gate.in_features and up.out_features == gate.out_features == down.in_features
            and gate.compute_dtype == up.compute_dtype == down.compute_dtype):
        return None
    return _activation_name(getattr(module, "act_fn", None))


def _mlp_probe_agrees(module: nn.Module, activation: str) -> bool:
    """Whether ``module``'s own forward gives exactly what the fused call gives on a probe. The
    activation's ``exp`` or ``tanh`` is the one step computed differently (torch's vectorized one
    and the kernel's may differ in the last bit of a float32): in bf16 and fp16 that almost never
    survives the rounding that follows, in float32 it shows, so float32 MLPs keep their own
    forward."""
    gate = _base(module.gate_proj)
    x = (torch.randn((4, gate.in_features), generator=torch.Generator().manual_seed(0)) * 2).to(gate.compute_dtype)
    fused = _FastMLP(module, activation)
    with torch.inference_mode():
        for row in x.split(FUSED_MLP_MAX_ROWS):  # calls that the fused path takes
            try:
                want = type(module).forward(module, row)
            except Exception:
                return False
            got = fused(row)
            if not (isinstance(want, torch.Tensor) and want.dtype == got.dtype and torch.equal(want, got)):
                return False
    return True


def fused_mlps(model: nn.Module) -> int:
    """Gives every gated MLP of ``model`` (``gate_proj``, ``up_proj``, ``down_proj`` 4-bit without
    bias, ``act_fn`` one of :data:`GATE_ACTIVATIONS`) whose forward agrees with the fused call on a
    probe the fused forward (bf16 and fp16 ones: see :func:`_mlp_probe_agrees`); returns how many.
    Its layers keep their own forward (and are still what adapters wrap)."""
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _FastMLP):
            continue
        activation = _mlp_activation(module)
        if activation is not None and _mlp_probe_agrees(module, activation):
            module.forward = _FastMLP(module, activation)
            count += 1
    return count


def _norm_style(module: nn.Module) -> Optional[tuple]:
    """``(unit_offset,)``: the style in which the kernel gives exactly what ``module``'s own
    forward gives on a probe of three rows (values over several orders of magnitude, the weight's
    own and, since Gemma's starts at zero, a random one) in its weight's dtype; None for neither.
    The probe decides: a module names no style."""
    weight = module.weight.detach()
    generator = torch.Generator().manual_seed(0)
    shape = (3, weight.shape[0])
    x = (torch.randn(shape, generator=generator) * torch.logspace(-2, 2, 3)[:, None]).to(weight.dtype)
    probe_weight = (torch.randn(weight.shape, generator=generator) * 0.5).to(weight.dtype)
    eps = _norm_eps(module)
    try:
        with torch.no_grad():
            want = [type(module).forward(module, x)]
            other = copy.deepcopy(module)  # the module's own weight stays untouched
            other.weight = nn.Parameter(probe_weight, requires_grad=False)
            want.append(type(other).forward(other, x))
    except Exception:
        return None
    for unit_offset in (False, True):
        got = []
        for w in (weight, probe_weight):
            out = torch.empty_like(x)
            _lib.cpu_rms_norm(_capsule(x), _capsule(w), eps, _capsule(out), unit_offset)
            got.append(out)
        if all(isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(want, got)):
            return (unit_offset,)
    return None


def fast_rms_norms(model: nn.Module) -> int:
    """Gives every RMS norm of ``model`` whose forward agrees with the kernel in one of its styles
    (:func:`_norm_style`: Llama's, or Gemma's ``1 + weight``) the kernel's forward; returns how
    many. Candidates: a 1-D floating ``weight`` on the CPU and a float ``variance_epsilon`` or
    ``eps``, the names transformers' RMS norms use."""
    def candidate(module: nn.Module) -> bool:
        weight = module._parameters.get("weight")
        return (weight is not None and weight.dim() == 1 and weight.is_floating_point() and weight.is_cpu
                and _norm_eps(module) is not None)

    # Each module's own weight and epsilon would agree alike.
    return _install(model, _FastRMSNorm, candidate, lambda module: module.weight.dtype, _norm_style)


def _install(model: nn.Module, forward: type, candidate, dtype, agrees) -> int:
    """Gives each module of ``model`` that is a ``candidate`` (and has no such forward yet) the
    ``forward(module, *options)``, where ``agrees(module)`` gives those options (a tuple; None:
    it does not agree) for the first module of its class and ``dtype(module)`` (one probe for all
    of them); returns how many."""
    count = 0
    probed: dict = {}
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), forward) or not candidate(module):
            continue
        key = (type(module), dtype(module))
        if key not in probed:
            probed[key] = agrees(module)
        if probed[key] is not None:
            module.forward = forward(module, *probed[key])
            count += 1
    return count


def _attention_function():
    """The function registered as :data:`ATTENTION`: one query token per sequence on the CPU by the
    Rust kernel, anything else by transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def qlora_rs_cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        if (dropout == 0.0 and query.is_cpu and type(query) is torch.Tensor and not any(
                kwargs.get(name) for name in _SDPA_ONLY) and _untraced(query, key) and _untraced(value, None)):
            done = _attend_one_token(query, key, value, attention_mask, scaling)
            if done is not None:
                return done
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    return qlora_rs_cpu_attention


# Arguments of the attention interface that the kernel does not take (set: SDPA's function runs).
_SDPA_ONLY = ("softcap", "s_aux", "position_bias", "output_attentions")


def _attend_one_token(query, key, value, attention_mask, scaling):
    """``(out [b, 1, heads, dim], None)`` by the Rust kernel for one query token per sequence of
    CPU tensors that need no graph, or None where the shapes, dtypes or mask do not suit it."""
    b, heads, q_len, dim = query.shape
    if (q_len != 1 or key.dtype != query.dtype or value.dtype != query.dtype or key.shape[1] == 0
            or heads % key.shape[1] != 0 or value.shape != key.shape):
        return None
    length = key.shape[2]
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != (b, 1, 1, length) or attention_mask.dtype not in (torch.bool, torch.float32):
            return None
        mask = attention_mask.reshape(b, length)
        if mask.dtype == torch.bool:
            mask = torch.zeros((b, length), dtype=torch.float32).masked_fill_(~mask, -math.inf)
        else:
            mask = mask.contiguous()
    q = query.reshape(b, heads, dim).contiguous()
    out = q.new_empty((b, 1, heads, dim))
    scale = scaling if scaling is not None else dim ** -0.5
    _lib.cpu_attend_one_token(_capsule(q), _capsule(key.contiguous()), _capsule(value.contiguous()),
                              None if mask is None else _capsule(mask), float(scale), b, heads, key.shape[1],
                              length, dim, _capsule(out))
    return out, None


def _register() -> bool:
    """Registers :data:`ATTENTION` (and SDPA's mask for it) with transformers, once; False for a
    transformers without the attention interface."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention_function())
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return True


def _set_attention(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:
        model.config._attn_implementation = name


def attention(model: nn.Module) -> Optional[str]:
    """Gives a transformers model that attends by SDPA (the default) the :data:`ATTENTION`
    implementation; returns the one it replaced, or None when it left the model as it was
    (another implementation chosen, no attention interface, a model that refuses the name)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not _register():
        return None
    try:
        _set_attention(model, ATTENTION)
    except (ValueError, TypeError, AttributeError, ImportError):
        return None
    if getattr(config, "_attn_implementation", None) != ATTENTION:
        return None
    model._qlora_rs_attention = "sdpa"
    return "sdpa"


# ------------------------------------------------------------------ attention modules

# The named arguments of the attention modules' forward (transformers 5.2x renamed past_key_values
# to cache); whatever else a caller passes goes on to the attention function, as there.
_ATTENTION_NAMED = ("hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values")

#: Attention classes whose forward :class:`_FastAttention` restates (checked on a probe besides,
#: once per class, dtype and ``use_rope``: a class whose layers differ in another way, as
#: Exaone4's global layers without rotary embeddings, must not be here). SmolLM3's layers skip
#: the rotary embeddings where ``use_rope`` is 0, as the steps do. Gemma's and Granite's forward is Llama's
#: (their scaling is the module's ``scaling``); Mistral's, Qwen2's, Qwen3's and Gemma3's hand a
#: ``sliding_window`` to the attention function, which the registered function does not need: the
#: window is in the mask it gets, and a sliding-window layer of the cache (``DynamicSlidingWindowLayer``)
#: returns from its ``update`` the keys and values that mask covers, as it does for their forward;
#: Qwen2's q, k and v may have a bias; Qwen3's and Gemma3's norm each head of the query and key
#: (``q_norm``, ``k_norm``) before the rotary embeddings.
FAST_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                          "Gemma3Attention", "GraniteAttention", "SmolLM3Attention")


class _FastAttention:
    """The forward of a Llama-style attention module (:data:`FAST_ATTENTION_CLASSES`), for one
    token a step on CPU inference with a dynamic cache, in the module's own steps but fewer calls:
    its projections (one kernel call for q, k and v when grouped), the rotary embeddings of query and key by one Rust call
    (:func:`qlora_rs._lib.cpu_rotary`, the bits of ``apply_rotary_pos_emb``), the cache's update,
    the :data:`ATTENTION` function called directly, the output projection. Anything else (more
    tokens, training, autograd, other caches, another attention implementation): the module's own
    forward."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        out = self.step(args, kwargs)
        return type(self.module).forward(self.module, *args, **kwargs) if out is None else out

    def step(self, args: tuple, kwargs: dict):
        """The forward's ``(output, weights)`` by the one-token steps, or None where they do not
        apply (before anything is computed that changes the cache)."""
        attended = self.attend(args, kwargs)
        if attended is None:
            return None
        out, weights = attended
        return _products((self.module._modules["o_proj"],), out)[0], weights

    def attend(self, args: tuple, kwargs: dict, plan: Optional[_LayerPlan] = None):
        """The steps before the output projection: ``(attention output [batch, 1, heads * dim],
        weights)``, or None where they do not apply (before anything is computed that changes the
        cache). With the ``plan`` of the decoder layer calling it (:class:`_FastDecoderLayer`), the
        projections as that plan holds them."""
        module = self.module
        hidden = args[0] if len(args) == 1 else kwargs.get("hidden_states") if not args else None
        embeddings = kwargs.get("position_embeddings")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (type(hidden) is not torch.Tensor or hidden.dim() != 3 or hidden.shape[1] != 1 or not hidden.is_cpu
                or embeddings is None or module.training or kwargs.get("output_attentions")
                or type(cache) is not _DYNAMIC_CACHE or (plan is None and not _untraced(hidden, None))
                or module.config._attn_implementation != ATTENTION):
            return None
        cached, index = getattr(cache, "layers", None), module.layer_idx
        cos, sin = embeddings
        batch, dim = hidden.shape[0], module.head_dim
        if (not isinstance(cached, list) or index >= len(cached) or type(cached[index]) not in _DYNAMIC_LAYERS
                or type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or cos.dtype != hidden.dtype
                or sin.dtype != hidden.dtype or cos.shape not in ((batch, 1, dim), (1, 1, dim))
                or sin.shape != cos.shape):
            return None
        if cos.shape[0] != batch:  # one position for the whole batch (no padding): broadcast, as the forward does
            cos, sin = cos.expand(batch, 1, dim), sin.expand(batch, 1, dim)
        projections = module._modules
        if plan is None:
            q, k, v = _products((projections["q_proj"], projections["k_proj"], projections["v_proj"]), hidden)
        else:
            q, k, v = plan.products(0, hidden)
        if q.shape[-1] % dim or k.shape[-1] % dim:
            return None  # the forward then starts over
        q_norm = projections.get("q_norm")
        if q_norm is not None:  # Qwen3's and Gemma3's norms over each head, before the rotary embeddings
            q, k = q_norm(q.view(batch, 1, -1, dim)), projections["k_norm"](k.view(batch, 1, -1, dim))
        if not (q.dtype == k.dtype == v.dtype == hidden.dtype):
            return None
        q, k = q.contiguous(), k.contiguous()
        if module.__dict__.get("use_rope", True):  # SmolLM3's layers without rotary embeddings: False
            q_rot, k_rot = torch.empty_like(q), torch.empty_like(k)
            _lib.cpu_rotary(_capsule(q), _capsule(k), _capsule(cos.contiguous()), _capsule(sin.contiguous()), batch,
                            dim, _capsule(q_rot), _capsule(k_rot))
        else:
            q_rot, k_rot = q, k
        query = q_rot.view(batch, 1, -1, dim).transpose(1, 2)
        key, value = cache.update(k_rot.view(batch, 1, -1, dim).transpose(1, 2),
                                  v.view(batch, 1, -1, dim).transpose(1, 2), index)
        mask = kwargs.get("attention_mask")
        # The registered function's own path, without its checks of what is known here.
        done = (None if any(kwargs.get(name) for name in _SDPA_ONLY) or not _untraced(key, value)
                else _attend_one_token(query, key, value, mask, module.scaling))
        if done is None:
            rest = {name: arg for name, arg in kwargs.items() if name not in _ATTENTION_NAMED}
            done = _ATTEND(module, query, key, value, mask, dropout=0.0, scaling=module.scaling, **rest)
        out, weights = done
        return out.reshape(batch, 1, -1).contiguous(), weights


def _hooked(layers) -> bool:
    """Whether calling any of these modules would run a hook (its own or a global one)."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks or any(
                    layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                    or layer._backward_pre_hooks for layer in layers))


def _products(layers, x: torch.Tensor) -> list:
    """``[layer(x) for layer in layers]``, the same bits: for 4-bit layers without hooks, plain or
    in qlora-rs LoRA layers whose shares a Rust call adds (:func:`_adapted`), in x's compute dtype,
    one kernel call (:func:`~qlora_rs.core.ops.cpu_matmul_group`) without the module calls, a bias
    and the adapters' shares added as the layers add them; else the module calls (x: a CPU tensor
    that needs no graph)."""
    bases, shares = _adapted(layers, x)
    if (bases is not None and all(base.compute_dtype == x.dtype and base.in_features == x.shape[-1] for base in bases)
            and not _hooked(layers)):
        weights = [base._cpu_kernel_weight() for base in bases]
        biases = [base._parameters["bias"] for base in bases]
        if None not in weights and not _needs_graph(*biases):
            return _computed(weights, biases, shares, x)
    return [layer(x) for layer in layers]


def _computed(weights: Sequence[CpuPackedWeight], biases: Sequence[Optional[torch.Tensor]], shares: Optional[list],
              x: torch.Tensor) -> list:
    """The products of :func:`_products` where the kernels take them: ``x @ W^T`` for each kept
    weight in one call, its layer's bias and LoRA share (:func:`_adapted`) added as the layer adds them."""
    outs = [y if b is None else y + b.to(y.dtype) for y, b in zip(cpu_matmul_group(weights, x), biases)]
    if shares is not None:
        x = x.contiguous()
        for y, share in zip(outs, shares):
            if share is not None:
                _lib.cpu_lora_add(share, _capsule(x), _capsule(y))
    return outs


# transformers' DynamicCache and its two kinds of layer, and the function registered as ATTENTION: looked up
# once, when fast_attentions installs the first forward.
_DYNAMIC_CACHE: Any = None
_DYNAMIC_LAYERS: tuple = ()
_ATTEND: Any = None


def _attention_candidate(module: nn.Module) -> bool:
    modules = module._modules
    return (type(module).__name__ in FAST_ATTENTION_CLASSES and isinstance(getattr(module, "layer_idx", None), int)
            and isinstance(getattr(module, "head_dim", None), int)
            and all(isinstance(modules.get(n), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(modules.get("q_norm"), nn.Module) == isinstance(modules.get("k_norm"), nn.Module))


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a projection computes in: a 4-bit layer's compute dtype, else its weight's."""
    base = _base(layer)
    return base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype


def _attention_probe_agrees(module: nn.Module) -> Optional[tuple]:
    """``()`` where ``module``'s own forward and :class:`_FastAttention` give the same output and
    cache, bit for bit, on a probe (three tokens' prefill, then one token, in the dtype of its
    layers); else None."""
    q, dtype = _base(module.q_proj), _layer_dtype(module.q_proj)
    generator = torch.Generator().manual_seed(0)

    def inputs(n):
        angles = torch.randn((1, n, module.head_dim), generator=generator)
        hidden = torch.randn((1, n, q.in_features), generator=generator).to(dtype)
        return dict(hidden_states=hidden, position_embeddings=(angles.cos().to(dtype), angles.sin().to(dtype)),
                    attention_mask=None)

    name = "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"
    prefill, token = inputs(3), inputs(1)
    caches = (_DYNAMIC_CACHE(), _DYNAMIC_CACHE())
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for cache in caches:
                type(module).forward(module, **prefill, **{name: cache})
            want, _ = type(module).forward(module, **token, **{name: caches[0]})
            got = _FastAttention(module).step((), {**token, name: caches[1]})
    except Exception:
        return None
    finally:
        module.train(training)
    if got is None or not isinstance(want, torch.Tensor) or want.dtype != got[0].dtype or not torch.equal(want, got[0]):
        return None
    a, b = caches[0].layers[module.layer_idx], caches[1].layers[module.layer_idx]
    return () if torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) else None


def fast_attentions(model: nn.Module) -> int:
    """Gives every attention module of ``model`` of a class in :data:`FAST_ATTENTION_CLASSES` whose
    forward agrees with :class:`_FastAttention` on a probe (one probe per class, dtype and
    ``use_rope``) that forward; returns how many. Only for a model that attends by :data:`ATTENTION` (see
    :func:`attention`)."""
    global _DYNAMIC_CACHE, _DYNAMIC_LAYERS, _ATTEND
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != ATTENTION:
        return 0
    try:
        from transformers import AttentionInterface
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:
        return 0
    attend = AttentionInterface._global_mapping.get(ATTENTION)
    if attend is None:
        return 0
    _DYNAMIC_CACHE, _DYNAMIC_LAYERS, _ATTEND = DynamicCache, (DynamicLayer, DynamicSlidingWindowLayer), attend
    # One probe per class, dtype and kind of layer (SmolLM3's with and without rotary embeddings).
    return _install(model, _FastAttention, _attention_candidate,
                    lambda module: (_layer_dtype(module.q_proj), bool(module.__dict__.get("use_rope", True))),
                    _attention_probe_agrees)


# ------------------------------------------------------------------ decoder layers

#: Decoder layer classes of one of the two forms the steps restate, with their arguments handed on
#: to the attention module: Llama's, ``h = x + self_attn(input_layernorm(x))``, then
#: ``h + mlp(post_attention_layernorm(h))``; and Gemma3's, with a norm after the attention and
#: after the MLP too: ``h = x + post_attention_layernorm(self_attn(input_layernorm(x)))``, then
#: ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``. Checked on a probe
#: besides, once per class and dtype (Granite's layers, which scale the residual sums, are of
#: neither form and fail it).
FAST_DECODER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                        "GemmaDecoderLayer", "Gemma3DecoderLayer", "SmolLM3DecoderLayer")

# A decoder layer's parts in each form, in the order its forward calls them, and the forward each must have.
_LLAMA_PARTS = (("input_layernorm", _FastRMSNorm), ("self_attn", _FastAttention),
                ("post_attention_layernorm", _FastRMSNorm), ("mlp", _FastMLP))
_GEMMA3_PARTS = (("input_layernorm", _FastRMSNorm), ("self_attn", _FastAttention),
                 ("post_attention_layernorm", _FastRMSNorm), ("pre_feedforward_layernorm", _FastRMSNorm),
                 ("mlp", _FastMLP), ("post_feedforward_layernorm", _FastRMSNorm))


def _decoder_parts(layer: nn.Module) -> tuple:
    """The parts of ``layer``'s form (Gemma3's where it has a ``pre_feedforward_layernorm``)."""
    return _GEMMA3_PARTS if "pre_feedforward_layernorm" in layer._modules else _LLAMA_PARTS


def _has_parts(layer: nn.Module) -> bool:
    """Whether ``layer`` has the parts of its form, and its attention and MLP their projections."""
    modules = layer._modules
    if not all(isinstance(modules.get(name), nn.Module) for name, _ in _decoder_parts(layer)):
        return False
    attention, mlp = modules["self_attn"]._modules, modules["mlp"]._modules
    return (all(isinstance(attention.get(n), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(isinstance(mlp.get(n), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")))


class _LayerPlan:
    """What a decoder layer's one-token step reads, gathered once and checked at every token:
    its parts and their parts (the same objects), their forwards (this module's), the weights the
    4-bit layers keep for the kernels (:meth:`Linear4bit._cpu_kernel_weight`, which sees any write
    or new tensor), and the forward hooks of every module below the layer, which must stay empty
    (hooks are registered into those dicts). ``usable`` is False where the step cannot run (a
    4-bit layer off the CPU, projections of different dtypes). ``forwards``: each part's
    ``(module, forward)`` by name; ``mlp_norm`` the name of the norm before the MLP, ``post`` the
    names of the norms after the attention and after the MLP in Gemma3's form (else None)."""

    __slots__ = ("layer", "parts", "attention_parts", "mlp_parts", "forwards", "mlp_norm", "post", "hooks", "bases",
                 "weights", "groups", "group_bases", "group_weights", "adapted", "dtype", "width", "usable")

    def __init__(self, layer: nn.Module) -> None:
        modules = layer._modules
        attention, mlp = modules["self_attn"], modules["mlp"]
        names = _decoder_parts(layer)
        self.layer = layer
        self.parts = tuple(modules.values())
        self.attention_parts = tuple(attention._modules.values())
        self.mlp_parts = tuple(mlp._modules.values())
        self.forwards = {name: (modules[name], modules[name].__dict__.get("forward")) for name, _ in names}
        gemma3 = names is _GEMMA3_PARTS
        self.mlp_norm = "pre_feedforward_layernorm" if gemma3 else "post_attention_layernorm"
        self.post = ("post_attention_layernorm", "post_feedforward_layernorm") if gemma3 else None
        self.hooks = tuple(hooks for part in self.parts for module in part.modules()
                           for hooks in (module._forward_hooks, module._forward_pre_hooks))
        projections = attention._modules
        self.groups = ((projections["q_proj"], projections["k_proj"], projections["v_proj"]), (projections["o_proj"],),
                       (mlp._modules["gate_proj"], mlp._modules["up_proj"], mlp._modules["down_proj"]))
        self.bases = tuple(_base(layer) for group in self.groups for layer in group)
        self.weights = self._kept()
        self.adapted = any(type(layer) is not Linear4bit for group in self.groups for layer in group)
        dtypes = {getattr(base, "compute_dtype", None) for base in self.bases}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.width = getattr(self.bases[0], "in_features", None)
        self.usable = (all(type(self.forwards[name][1]) is kind for name, kind in names)
                       and all(type(base) is Linear4bit for base in self.bases) and None not in self.weights
                       and self.dtype is not None)
        bounds = ((0, 3), (3, 4), (4, 7))
        self.group_bases = tuple(self.bases[a:b] for a, b in bounds)
        self.group_weights = tuple(self.weights[a:b] for a, b in bounds)

    def _kept(self) -> tuple:
        return tuple(base._cpu_kernel_weight() if type(base) is Linear4bit else None for base in self.bases)

    def current(self) -> bool:
        """Whether the layer still has the parts, forwards and kept weights of this plan."""
        forwards = self.forwards
        return (tuple(self.layer._modules.values()) == self.parts
                and tuple(forwards["self_attn"][0]._modules.values()) == self.attention_parts
                and tuple(forwards["mlp"][0]._modules.values()) == self.mlp_parts
                and all(module.__dict__.get("forward") is forward for module, forward in forwards.values())
                and self._kept() == self.weights)

    def hooked(self) -> bool:
        """Whether a forward hook would run in the layer's parts (its own run as it is called)."""
        return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                    or any(self.hooks))

    def products(self, group: int, x: torch.Tensor) -> list:
        """What :func:`_products` gives for the projections of ``group`` (0: q, k, v; 1: o)."""
        layers = self.groups[group]
        shares = None
        if self.adapted:
            bases, shares = _adapted(layers, x)
            if bases is None:
                return [layer(x) for layer in layers]
        return _computed(self.group_weights[group], [base._parameters["bias"] for base in self.group_bases[group]],
                         shares, x)

    def tail(self, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output after its attention (``hidden``: the layer's input): the output
        projection, the residual sum, the MLP and its residual sum, with the norms of the
        layer's form. Up to :data:`FUSED_MLP_MAX_ROWS` rows one Rust call
        (:func:`qlora_rs._lib.cpu_decoder_tail`: the same kernels and roundings as the parts'
        steps, so their bits); else those steps."""
        names = (self.mlp_norm,) + (self.post or ())
        norms = [self.forwards[name] for name in names]
        weights = [module._parameters["weight"] for module, _ in norms]
        rows = hidden.numel() // self.width
        if (rows > FUSED_MLP_MAX_ROWS or any(w.dtype != hidden.dtype or not w.is_cpu or w.shape[0] != self.width
                                             for w in weights)
                or len({(_norm_eps(module), forward.unit_offset) for module, forward in norms}) != 1):
            return self._tail_steps(attended, hidden)
        o_share = mlp_shares = None
        if self.adapted:
            bases, o_share = _adapted(self.groups[1], attended)
            mlp_bases, mlp_shares = _adapted(self.groups[2], hidden)
            if bases is None or mlp_bases is None:
                return self._tail_steps(attended, hidden)
            o_share = o_share[0]
        o, (gate, up, down) = self.group_weights[1][0], self.group_weights[2]
        bias = self.group_bases[1][0]._parameters["bias"]
        hidden = hidden.contiguous()
        out = torch.empty_like(hidden)
        dtype = hidden.dtype
        (norm, forward), post = norms[0], [_capsule(w) for w in weights[1:]]
        _lib.cpu_decoder_tail(
            _capsule(attended), o._packed_for(rows, dtype), None if bias is None else _capsule(bias), o_share,
            _capsule(hidden), _capsule(weights[0]), _norm_eps(norm), forward.unit_offset, gate._packed_for(rows, dtype),
            up._packed_for(rows, dtype), down._packed_for(rows, dtype), mlp_shares, self.forwards["mlp"][1].activation,
            _capsule(out), None, tuple(post) if post else None)
        return out

    def _tail_steps(self, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        out = self.products(1, attended)[0]
        if self.post:
            out = self.norm(self.post[0], out)
        hidden = hidden + out
        out = self.mlp(self.norm(self.mlp_norm, hidden))
        if self.post:
            out = self.norm(self.post[1], out)
        return hidden + out

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for ``x`` (one token a sequence), as its forward gives it."""
        forward = self.forwards["mlp"][1]
        if x.numel() > FUSED_MLP_MAX_ROWS * self.width:
            return forward(x)
        shares = None
        if self.adapted:
            bases, shares = _adapted(self.groups[2], x)
            if bases is None:
                return forward(x)
        return _fused_mlp(self.group_weights[2], shares, forward.activation, x)

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The RMS norm ``name`` of ``x`` (one token a sequence), as its forward gives it."""
        module, forward = self.forwards[name]
        weight = module._parameters["weight"]
        if (weight.dtype != x.dtype or weight.shape[0] != x.shape[-1] or not weight.is_cpu
                or x.numel() > RMS_NORM_KERNEL_MAX_ROWS * self.width):
            return forward(x)
        return forward.kernel(x, weight)


class _FastDecoderLayer:
    """The forward of a decoder layer of :data:`FAST_DECODER_CLASSES` whose parts take this
    module's steps, for one token a sequence on CPU inference with no autograd (generation):
    the parts' steps called one after the other as the forward calls them, without their module
    calls, on what its :class:`_LayerPlan` holds (checked at every token); the norms and the MLP
    take their module's forward above their kernels' rows. Anything else (more tokens, autograd,
    training, a hook on a part, other caches): the layer's own forward, whose parts take their
    own steps where they apply."""

    __slots__ = ("module", "_plan")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._plan: Optional[_LayerPlan] = None

    def __call__(self, *args, **kwargs):
        out = self.step(args, kwargs)
        return type(self.module).forward(self.module, *args, **kwargs) if out is None else out

    # Pickled and copied with the model (torch.save, copy.deepcopy): the layer, not the plan.
    def __getstate__(self):
        return self.module

    def __setstate__(self, module) -> None:
        self.module, self._plan = module, None

    def step(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The forward's output by the parts' steps, or None where they do not apply (before
        anything is computed that changes the cache)."""
        if len(args) != 1 or torch.is_grad_enabled() or self.module.training:
            return None
        hidden = args[0]
        if type(hidden) is not torch.Tensor or hidden.dim() != 3 or hidden.shape[1] != 1:
            return None
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = _LayerPlan(self.module) if _has_parts(self.module) else None
        if (plan is None or not plan.usable or hidden.dtype != plan.dtype or hidden.shape[2] != plan.width or not hidden.is_cpu
                or plan.hooked() or torch.compiler.is_compiling() or not _no_modes()):
            return None
        attended = plan.forwards["self_attn"][1].attend((plan.norm("input_layernorm", hidden),), kwargs, plan)
        return None if attended is None else plan.tail(attended[0], hidden)


def _decoder_candidate(module: nn.Module) -> bool:
    modules = module._modules
    return type(module).__name__ in FAST_DECODER_CLASSES and _has_parts(module) and all(
        type(modules[name].__dict__.get("forward")) is kind for name, kind in _decoder_parts(module))


def _decoder_probe_agrees(layer: nn.Module) -> Optional[tuple]:
    """``()`` where ``layer``'s own forward and :class:`_FastDecoderLayer` give the same output and
    cache, bit for bit, on a probe (three tokens' prefill, then one token, in the dtype of its
    projections); else None."""
    attention = layer.self_attn
    dtype, width = _layer_dtype(attention.q_proj), _base(attention.q_proj).in_features
    generator = torch.Generator().manual_seed(0)

    def inputs(n):
        angles = torch.randn((1, n, attention.head_dim), generator=generator)
        return (torch.randn((1, n, width), generator=generator).to(dtype),), dict(
            position_embeddings=(angles.cos().to(dtype), angles.sin().to(dtype)), attention_mask=None)

    name = "cache" if "cache" in inspect.signature(type(attention).forward).parameters else "past_key_values"
    (prefill, prefill_kw), (token, token_kw) = inputs(3), inputs(1)
    caches = (_DYNAMIC_CACHE(), _DYNAMIC_CACHE())
    training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            for cache in caches:
                type(layer).forward(layer, *prefill, **prefill_kw, **{name: cache})
            want = type(layer).forward(layer, *token, **token_kw, **{name: caches[0]})
            got = _FastDecoderLayer(layer).step(token, {**token_kw, name: caches[1]})
    except Exception:
        return None
    finally:
        layer.train(training)
    if got is None or not isinstance(want, torch.Tensor) or want.dtype != got.dtype or not torch.equal(want, got):
        return None
    a, b = caches[0].layers[attention.layer_idx], caches[1].layers[attention.layer_idx]
    return () if torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) else None


def fast_decoder_layers(model: nn.Module) -> int:
    """Gives every decoder layer of ``model`` of a class in :data:`FAST_DECODER_CLASSES` whose parts
    all take this module's steps (run after :func:`fast_rms_norms`, :func:`fused_mlps` and
    :func:`fast_attentions`) and whose forward agrees with :class:`_FastDecoderLayer` on a probe
    (one per class and dtype) that forward; returns how many."""
    if _DYNAMIC_CACHE is None:
        return 0
    return _install(model, _FastDecoderLayer, _decoder_candidate, lambda layer: _layer_dtype(layer.self_attn.q_proj),
                    _decoder_probe_agrees)
