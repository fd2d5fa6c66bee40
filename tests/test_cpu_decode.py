"""The CPU decoding path (qlora_rs.nn.cpu_decode): grouped sibling projections give each layer's
own product bit for bit and dissolve when a model does not call them as expected; the Rust RMS
norm equals transformers' LlamaRMSNorm bit for bit and replaces nothing else; the one-token
attention agrees with SDPA (grouped heads, padding masks) and hands everything else to it; the
rotary embeddings equal transformers' and Llama's attention modules decode as their own forward
does, bit for bit, as do the decoder layers that call the parts' steps themselves; and on the real
SmolLM2-135M-Instruct the prepared model generates as the unprepared one does."""

from __future__ import annotations

import copy
import inspect
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_rs
from _loading_helpers import make_tiny_family, make_tiny_llama
from qlora_rs import _lib
from qlora_rs.nn import Linear4bit, cpu_decode
from qlora_rs.nn.linear4bit import ProjectionGroup

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _unprepared(path):
    model = qlora_rs.from_pretrained(path)
    cpu_decode.restore(model)
    return model


# ------------------------------------------------------------------ grouped projections


def test_from_pretrained_prepares_cpu_models(tiny_dir):
    model = qlora_rs.from_pretrained(tiny_dir)
    done = model.qlora_rs_cpu_decode
    # 2 layers: q/k/v and gate/up each, one MLP each; 2 norms a layer and the final one.
    assert (done.groups, done.norms, done.mlps, done.attention, done.attentions, done.layers) == (4, 5, 2, "sdpa", 2, 2)
    assert model.config._attn_implementation == cpu_decode.ATTENTION
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._cpu_group is attn.k_proj._cpu_group is attn.v_proj._cpu_group is not None
    assert attn.o_proj._cpu_group is None
    # The implementation is not saved: the config written for others names none of ours.
    assert cpu_decode.ATTENTION not in model.config.to_json_string()
    assert cpu_decode.prepare(model) == cpu_decode.CpuDecode(0, 0, 0, None)  # already done

    cpu_decode.restore(model)
    assert model.config._attn_implementation == "sdpa"
    assert attn.q_proj._cpu_group is None and "forward" not in model.model.norm.__dict__
    assert "forward" not in model.model.layers[0].mlp.__dict__ and "forward" not in attn.__dict__
    assert "forward" not in model.model.layers[0].__dict__


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_group_gives_each_layer_its_own_product(tiny_dir, rows):
    model = qlora_rs.from_pretrained(tiny_dir)
    plain = _unprepared(tiny_dir)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    for grouped, alone in ((model.model.layers[1].self_attn, plain.model.layers[1].self_attn),
                           (model.model.layers[1].mlp, plain.model.layers[1].mlp)):
        names = ["q_proj", "k_proj", "v_proj"] if hasattr(grouped, "q_proj") else ["gate_proj", "up_proj"]
        with torch.inference_mode():
            got = [getattr(grouped, n)(x) for n in names]
            want = [getattr(alone, n)(x) for n in names]
        for n, g, w in zip(names, got, want):
            assert torch.equal(g, w), n


def test_a_group_runs_one_kernel_call_and_dissolves_when_not_called_as_expected(tiny_dir, monkeypatch):
    model = qlora_rs.from_pretrained(tiny_dir)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj._cpu_group
    calls = []
    real = _lib.cpu_gemm_4bit_group
    monkeypatch.setattr(_lib, "cpu_gemm_4bit_group", lambda *a: calls.append(len(a[0])) or real(*a))
    x, other = torch.randn(2, 1, 64).to(torch.bfloat16), torch.randn(2, 1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        assert calls == [3]
        # Another input: k computes its own (still the right product).
        attn.q_proj(x)
        assert torch.equal(attn.k_proj(other), attn.k_proj._cpu_kernel_weight().matmul(other))
        # v's kept product went unused; the next call leaves k's and v's unused again: dissolved.
        attn.q_proj(x)
        assert attn.q_proj._cpu_group is group
        attn.q_proj(x)
        assert attn.q_proj._cpu_group is None and attn.v_proj._cpu_group is None
        assert calls == [3, 3, 3]
    assert group.members == (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.inference_mode():
        assert torch.equal(attn.v_proj(x), v) and torch.equal(attn.q_proj(x), q)


def test_grouped_layers_with_lora_adapters_and_copies(tiny_dir):
    model = qlora_rs.from_pretrained(tiny_dir)
    qlora_rs.add_lora(model, r=4, alpha=8, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    plain = copy.deepcopy(model)
    cpu_decode.restore(plain)
    ids = torch.tensor([[5, 9, 11, 4]])
    with torch.inference_mode():
        a, b = model(ids).logits, plain(ids).logits
    assert torch.equal(a, b)  # prefill: groups and norms are exact, attention of 4 tokens is SDPA's
    again = pickle.loads(pickle.dumps(model))
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, a)


# ------------------------------------------------------------------ fused MLP


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fused_mlp_equals_the_modules_own_forward(tiny_dir, rows, monkeypatch):
    model = qlora_rs.from_pretrained(tiny_dir)
    mlp = model.model.layers[1].mlp
    calls = []
    real = _lib.cpu_gated_mlp_4bit
    monkeypatch.setattr(_lib, "cpu_gated_mlp_4bit", lambda *a: calls.append(1) or real(*a))
    x = (torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        got = mlp(x)
        want = type(mlp).forward(mlp, x)  # gate, up and down layers, SiLU and the product in torch
    # The fused call up to FUSED_MLP_MAX_ROWS rows (decoding one sequence), the module's own ops above.
    assert calls == ([1] if rows <= cpu_decode.FUSED_MLP_MAX_ROWS else []) and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_gelu_mlp_equals_gemmas_own_forward(dtype, monkeypatch):
    """Gemma's MLP (GELU with the tanh approximation) runs the fused call with that activation,
    the module's own bits in bf16 and fp16, row after row (float32 MLPs keep their forward: see
    cpu_decode._mlp_probe_agrees)."""
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    torch.manual_seed(0)
    mlp = GemmaMLP(GemmaConfig(hidden_size=128, intermediate_size=320)).to(dtype)
    qlora_rs.quantize_model(mlp, skip=(), compute_dtype=dtype)
    assert cpu_decode.fused_mlps(mlp) == 1 and mlp.forward.activation == "gelu_tanh"
    calls = []
    real = _lib.cpu_gated_mlp_4bit
    monkeypatch.setattr(_lib, "cpu_gated_mlp_4bit", lambda *a: calls.append(a[7]) or real(*a))
    x = (torch.randn(16, 1, 128, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.inference_mode():
        for row in x:
            assert torch.equal(mlp(row), GemmaMLP.forward(mlp, row))
    assert calls == ["gelu_tanh"] * 16
    mlp32 = GemmaMLP(GemmaConfig(hidden_size=128, intermediate_size=320))
    qlora_rs.quantize_model(mlp32, skip=(), compute_dtype=torch.float32)
    assert cpu_decode.fused_mlps(mlp32) == 0


def test_fused_mlp_of_large_layers_reads_what_the_layers_read():
    """Layers of 8 MiB and more read their 1-byte scale codes at one row on the AVX-512 levels
    (ops._CODES_WHERE_MEMORY_BOUND); the fused MLP takes the same weights, so the same bits."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlora_rs.core import ops

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=4096, intermediate_size=4096)).to(torch.bfloat16)
    qlora_rs.quantize_model(mlp, skip=())
    assert cpu_decode.fused_mlps(mlp) == 1
    assert (mlp.gate_proj._cpu_kernel_weight()._codes is not None) == ops._CODES_WHERE_MEMORY_BOUND
    x = torch.randn(1, 4096).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["down_proj"]])
def test_fused_mlp_with_lora_adapters_equals_the_modules_own_forward(tiny_dir, targets, monkeypatch):
    """LoRA layers on the projections (float32 adapters, eval, no grad): the fused call adds their
    shares as the layers add them, the same bits as the module's own forward, up to the rows the
    fused call takes; above, the module's own forward (whose layers add the shares themselves)."""
    from qlora_rs.nn.lora import LORA_KERNEL_MAX_ROWS

    model = qlora_rs.from_pretrained(tiny_dir)
    qlora_rs.add_lora(model, r=4, alpha=8, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    mlp = model.model.layers[1].mlp
    calls = []
    real = _lib.cpu_gated_mlp_4bit
    monkeypatch.setattr(_lib, "cpu_gated_mlp_4bit", lambda *a: calls.append(a[6] is not None) or real(*a))
    for rows in (1, 5, LORA_KERNEL_MAX_ROWS, LORA_KERNEL_MAX_ROWS + 1):
        x = (torch.randn(rows, 64, generator=g) * 3).to(torch.bfloat16)
        with torch.inference_mode():
            got = mlp(x)
            want = type(mlp).forward(mlp, x)
        assert torch.equal(got, want), rows
    assert calls == [True]  # the one row
    with torch.inference_mode():  # the shares count: without them the output moves
        for t in targets:
            getattr(mlp, t).lora_B.weight.zero_()
        assert not torch.equal(mlp(x[:1]), got[:1]) and calls[-1] is True


def test_fused_mlp_steps_aside_for_adapters_autograd_and_other_mlps(tiny_dir, monkeypatch):
    model = qlora_rs.from_pretrained(tiny_dir)
    calls = []
    real = _lib.cpu_gated_mlp_4bit
    monkeypatch.setattr(_lib, "cpu_gated_mlp_4bit", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 64).to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    with torch.enable_grad():
        y = mlp(x.requires_grad_())
        y.float().sum().backward()  # its own forward: autograd reaches x
    assert x.grad is not None and calls == []
    qlora_rs.add_lora(model, r=2, target_modules=["gate_proj"])
    model.train()
    with torch.inference_mode():
        mlp(x.detach())  # an adapter that drops out: the module's own forward runs it
    assert calls == []
    model.eval()
    handle = mlp.up_proj.register_forward_hook(lambda *a: calls.append("hook"))
    with torch.inference_mode():
        mlp(x.detach())  # a hook on a projection: the module's own forward, which runs it
    assert calls == ["hook"]
    handle.remove()

    class GeluMLP(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = layer.gate_proj, layer.up_proj, layer.down_proj
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    plain = _unprepared(tiny_dir)
    assert cpu_decode.fused_mlps(GeluMLP(plain.model.layers[0].mlp)) == 0
    assert cpu_decode.fused_mlps(plain) == 2


# ------------------------------------------------------------------ RMS norm


def _assert_norm_kernel_agrees(norm, forward, dtype):
    """``norm`` (with the kernel's forward) gives ``forward``'s bits on rows over six orders of
    magnitude: up to RMS_NORM_KERNEL_MAX_ROWS rows by the kernel (also from a view that is not
    contiguous), more by the module's own ops."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(7, 3, 576, generator=g) * torch.logspace(-3, 3, 7)[:, None, None]).to(dtype)
    calls = []
    real = _lib.cpu_rms_norm
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        patch.setattr(_lib, "cpu_rms_norm", lambda *a: calls.append(1) or real(*a))
        for rows in (x[0], x[1:3].transpose(0, 1), x[:, 0], x):  # 3, 2 x 2 (a view), 7 and 21 rows
            assert torch.equal(norm(rows), forward(norm, rows))
    assert calls == [1, 1, 1] and cpu_decode.RMS_NORM_KERNEL_MAX_ROWS < 21


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_equals_llamas_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3, generator=torch.Generator().manual_seed(1))
    assert cpu_decode.fast_rms_norms(norm) == 1
    _assert_norm_kernel_agrees(norm, LlamaRMSNorm.forward, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_rms_norm_equals_gemmas_bit_for_bit(family, dtype):
    """Gemma's norms (``x_hat * (1 + weight)`` in float32, rounded once) take the kernel's Gemma
    style, found by the probe; fresh (a zero weight) or trained, the module's own bits."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(module, f"{family.capitalize()}RMSNorm")
    for trained in (False, True):
        norm = cls(576, eps=1e-6).to(dtype)
        if trained:
            with torch.no_grad():
                norm.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        assert cpu_decode.fast_rms_norms(norm) == 1 and norm.forward.unit_offset
        _assert_norm_kernel_agrees(norm, cls.forward, dtype)


def test_rms_norm_leaves_other_norms_and_training_alone():
    class CenteredNorm(nn.Module):  # a norm of another formula (the mean taken out first)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(64))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float() - x.float().mean(-1, keepdim=True)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * h).to(x.dtype)

    class WeightlessNorm(CenteredNorm):  # agrees with Llama's style at the weight of one, not at others
        def forward(self, x):
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    assert cpu_decode.fast_rms_norms(CenteredNorm()) == 0
    assert cpu_decode.fast_rms_norms(WeightlessNorm()) == 0
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64)
    assert cpu_decode.fast_rms_norms(norm) == 1
    x = torch.randn(3, 64, requires_grad=True)
    norm(x).sum().backward()  # the module's own forward, so autograd works
    assert x.grad is not None and norm.weight.grad is not None


# ------------------------------------------------------------------ attention


def _sdpa(query, key, value, mask, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = nn.Module()
    module.num_key_value_groups = query.shape[1] // key.shape[1]
    module.is_causal = True
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scale)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [(1, 9, 3, 41, 64), (3, 4, 4, 7, 32), (2, 8, 1, 300, 128)])
def test_one_token_attention_agrees_with_sdpa(dtype, batch, heads, kv_heads, length, dim):
    cpu_decode._register()
    function = transformers.AttentionInterface._global_mapping[cpu_decode.ATTENTION]
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = (torch.randn(batch, kv_heads, length, dim, generator=g) * 2).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    # Left padding of the first sequence (bool, as SDPA's mask function makes it), or none.
    pad = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    pad[0, ..., : length // 3] = False
    for mask in (None, pad, torch.zeros(batch, 1, 1, length).masked_fill(~pad, -math.inf)):
        with torch.inference_mode():
            got, weights = function(module, q, k, v, mask, scaling=dim**-0.5)
            want = _sdpa(q.float(), k.float(), v.float(), None if mask is None else mask, dim**-0.5)
        assert weights is None and got.shape == (batch, 1, heads, dim) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_attention_hands_prefill_and_training_to_sdpa():
    cpu_decode._register()
    function = transformers.AttentionInterface._global_mapping[cpu_decode.ATTENTION]
    module = nn.Module()
    module.num_key_value_groups = 2
    module.is_causal = True
    q = torch.randn(1, 4, 5, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out, _ = function(module, q, k, v, None, scaling=0.25)  # 5 query tokens, with autograd
    assert torch.equal(out, _sdpa(q, k, v, None, 0.25))
    out.sum().backward()
    assert q.grad is not None


# ------------------------------------------------------------------ the real model


def test_smollm2_generates_as_without_the_decode_path(smollm2_dir):
    """SmolLM2-135M-Instruct: teacher-forced decoding steps of the prepared model against the same
    model without the path. The products and norms are exact; attention differs from SDPA's
    bf16 flash kernel only in rounding, so the logits stay close and the greedy choices agree."""
    fast = qlora_rs.from_pretrained(smollm2_dir)
    assert fast.qlora_rs_cpu_decode == cpu_decode.CpuDecode(60, 61, 30, "sdpa", 30, 30)
    plain = _unprepared(smollm2_dir)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The Python tutorial explains how lists, tuples and dictionaries differ:", return_tensors="pt").input_ids
    with torch.inference_mode():
        steps = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                               min_new_tokens=16, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        logits = {}
        for name, model in (("fast", fast), ("plain", plain)):
            cache = transformers.DynamicCache(config=model.config)
            # transformers 5 renamed the argument (past_key_values still works, with a warning)
            arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            out, rows = model(ids, use_cache=True, **{arg: cache}), []
            for t in steps:
                out = model(t.view(1, 1), use_cache=True, **{arg: cache})
                rows.append(out.logits[0, -1].float())
            logits[name] = torch.stack(rows)
    diff = (logits["fast"] - logits["plain"]).abs().max().item()
    spread = logits["plain"].std().item()
    # Measured on a Zen 5: 0.69 against a spread of 8.1 (a few bf16 units at the logits' scale),
    # where NF4 against the bf16 model moves them by whole units.
    assert diff < 0.2 * spread, (diff, spread)
    agree = (logits["fast"].argmax(-1) == logits["plain"].argmax(-1)).float().mean().item()
    assert agree >= 15 / 16, agree


def test_batched_generation_with_left_padding(tiny_dir):
    """Two prompts of different lengths, left-padded: the decoding steps take the padding mask
    (SDPA's boolean one) and give what SDPA gives (float32, so within its summation error)."""
    kwargs = dict(compute_dtype=torch.float32, dtype=torch.float32)
    fast = qlora_rs.from_pretrained(tiny_dir, **kwargs)
    plain = qlora_rs.from_pretrained(tiny_dir, **kwargs)
    cpu_decode.restore(plain)
    ids = torch.tensor([[0, 0, 0, 7, 21, 9], [5, 17, 30, 12, 8, 44]])
    mask = (ids != 0).long()
    seen = []
    real = _lib.cpu_attend_one_token
    outs = {}
    for name, model in (("fast", fast), ("plain", plain)):
        with torch.inference_mode():
            outs[name] = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                        pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(outs["fast"].sequences, outs["plain"].sequences)
    torch.testing.assert_close(torch.stack(outs["fast"].logits), torch.stack(outs["plain"].logits), atol=1e-4, rtol=1e-4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_lib, "cpu_attend_one_token", lambda *a: seen.append(a[3] is not None) or real(*a))
        with torch.inference_mode():
            fast.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    assert seen and all(seen)  # the kernel ran, with the padding mask, in every decoding step


# ------------------------------------------------------------------ attention modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,q_heads,k_heads,dim", [(1, 4, 2, 8), (3, 9, 3, 64), (2, 2, 2, 16)])
def test_rotary_equals_transformers_bit_for_bit(dtype, batch, q_heads, k_heads, dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(100 * batch + dim)
    q = (torch.randn(batch, q_heads, 1, dim, generator=g) * 4).to(dtype)
    k = (torch.randn(batch, k_heads, 1, dim, generator=g) * 4).to(dtype)
    angles = torch.randn(batch, 1, dim, generator=g) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = torch.empty_like(q), torch.empty_like(k)
    _lib.cpu_rotary(q, k, cos, sin, batch, dim, got_q, got_k)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_rotary_names_bad_shapes():
    q, k, cs = torch.zeros(2, 3, 8), torch.zeros(2, 1, 8), torch.zeros(2, 8)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="rotary: cos has 16 elements; 1 rows of 8 need 8"):
        _lib.cpu_rotary(q, k, cs, cs, 1, 8, torch.empty_like(q), torch.empty(1, 8))
    with pytest.raises(qlora_rs.InvalidArgumentError, match="an even number"):
        _lib.cpu_rotary(q, k, cs, cs, 2, 7, torch.empty_like(q), torch.empty_like(k))
    with pytest.raises(qlora_rs.InvalidArgumentError, match="expected one dtype"):
        _lib.cpu_rotary(q, k, cs.bfloat16(), cs, 2, 8, torch.empty_like(q), torch.empty_like(k))


def _without(model, *kinds):
    """A copy of ``model`` whose modules with a forward of these kinds run their own again."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module.__dict__.get("forward"), kinds):
            del module.forward
    return plain


def _without_fast_attention(model):
    return _without(model, cpu_decode._FastAttention)


# A batch of two four-token prompts, then five single tokens for each (teacher-forced).
IDS = torch.tensor([[5, 9, 11, 4], [7, 3, 2, 8]])
STEPS = torch.tensor([[12, 30, 6, 18, 40], [1, 2, 3, 4, 5]]).T


def _assert_same_caches(a, b):
    """The same kinds of layer holding the same keys and values, bit for bit."""
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert type(x) is type(y) and torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def _decode(model, ids, steps, cache):
    """Logits of a prefill of ``ids`` and of ``steps`` single tokens after it, teacher-forced."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        rows = [model(ids, use_cache=True, **{arg: cache}).logits[:, -1]]
        for t in steps:
            rows.append(model(t.view(-1, 1), use_cache=True, **{arg: cache}).logits[:, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_attention_decodes_as_the_modules_own_forward(tiny_dir, dtype, monkeypatch):
    """Prefill, then five single tokens for a batch of two: the same logits and the same cache,
    bit for bit, as the attention modules' own forward (everything else of the path in both);
    the one-token steps ran in every decoding step of both layers, and in no prefill."""
    fast = qlora_rs.from_pretrained(tiny_dir, compute_dtype=dtype, dtype=dtype)
    assert fast.qlora_rs_cpu_decode.attentions == 2
    plain = _without_fast_attention(fast)
    calls = []
    real = _lib.cpu_rotary
    monkeypatch.setattr(_lib, "cpu_rotary", lambda *a: calls.append(a[4]) or real(*a))
    ids, steps = IDS, STEPS
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    got = _decode(fast, ids, steps, caches[0])
    assert calls == [2] * 10
    want = _decode(plain, ids, steps, caches[1])
    assert len(calls) == 10 and torch.equal(got, want)
    _assert_same_caches(*caches)


def test_fast_attention_with_lora_adapters_decodes_as_the_modules_own_forward(tiny_dir, monkeypatch):
    """LoRA layers on q, k, v and o: the one-token steps run the 4-bit products in one call and
    add the adapters' shares as the layers do (no layer call), the same logits and cache, bit for
    bit, as the modules' own forward."""
    from qlora_rs.nn import LoraLinear4bit

    model = qlora_rs.from_pretrained(tiny_dir)
    qlora_rs.add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    plain = _without_fast_attention(model)
    forwards = []
    real = LoraLinear4bit.forward
    monkeypatch.setattr(LoraLinear4bit, "forward", lambda self, x: forwards.append(1) or real(self, x))
    ids, steps = IDS, STEPS
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    got = _decode(model, ids, steps, caches[0])
    assert len(forwards) == 2 * 4  # the prefill's layer calls only
    want = _decode(plain, ids, steps, caches[1])
    assert len(forwards) == 2 * 4 + 2 * 4 * 6 and torch.equal(got, want)  # then every call of the plain model
    _assert_same_caches(*caches)


# Mistral without a window; Qwen2 (a bias on q, k and v); Qwen2 with a window of 3 positions on
# its second layer (the layers from max_window_layers on), which the decoding below outgrows;
# Qwen3 (norms of each query and key head); Gemma (Llama's forward, another scaling; head_dim
# apart from hidden_size / heads); Gemma3 (head norms of its own kind after the transpose, a
# window of 3 on its first layer); Granite (Llama's forward, its own multipliers); SmolLM3 (its
# second layer without rotary embeddings).
FAMILIES = {
    "mistral": ("Mistral", {"sliding_window": None}),
    "qwen2": ("Qwen2", {}),
    "qwen2-window": ("Qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "qwen3": ("Qwen3", {}),
    "gemma": ("Gemma", {"head_dim": 8}),
    "gemma3": ("Gemma3", {"head_dim": 8, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("Granite", {"attention_multiplier": 0.2, "residual_multiplier": 0.5}),
    "smollm3": ("SmolLM3", {"no_rope_layers": [1, 0]}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    family, overrides = FAMILIES[request.param]
    return make_tiny_family(tmp_path_factory.mktemp(request.param), family, **overrides)


def test_fast_attention_of_other_families_decodes_as_their_own_forward(family_dir, monkeypatch):
    """The attention modules of the other families take the one-token steps (Qwen2's biased q, k
    and v in one kernel call; a sliding window comes in the mask; Qwen3's and Gemma3's head norms
    by their modules; SmolLM3's layer without rotary embeddings skips them, probed apart) and give
    the logits and cache of their own forward bit for bit, with a cache of full layers and with the
    model's own, whose sliding-window layers crop what they keep."""
    fast = qlora_rs.from_pretrained(family_dir)
    assert fast.qlora_rs_cpu_decode.attentions == 2
    rope = sum(bool(layer.self_attn.__dict__.get("use_rope", True)) for layer in fast.model.layers)
    plain = _without_fast_attention(fast)
    rotary, groups = [], []
    real_rotary, real_group = _lib.cpu_rotary, cpu_decode.cpu_matmul_group
    monkeypatch.setattr(_lib, "cpu_rotary", lambda *a: rotary.append(1) or real_rotary(*a))
    monkeypatch.setattr(cpu_decode, "cpu_matmul_group", lambda w, x: groups.append(len(w)) or real_group(w, x))
    ids, steps = IDS, STEPS
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    got = _decode(fast, ids, steps, caches[0])
    assert len(rotary) == 5 * rope and groups.count(3) == 10  # each step of both layers; q, k and v in one call
    want = _decode(plain, ids, steps, caches[1])
    assert torch.equal(got, want)
    _assert_same_caches(*caches)
    own = [transformers.DynamicCache(config=m.config) for m in (fast, plain)]
    rotary.clear()
    assert torch.equal(_decode(fast, ids, steps, own[0]), _decode(plain, ids, steps, own[1]))
    assert len(rotary) == 5 * rope  # sliding-window layers too
    _assert_same_caches(*own)


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_gemma_models_decode_as_without_the_path(family, tmp_path_factory, monkeypatch):
    """Gemma's and Gemma3's norms (``1 + weight``; Gemma3's four a layer and its query and key
    head norms) and GELU MLPs take the kernels, and give the logits and cache of the same model
    whose norms and MLPs run their own forward, bit for bit."""
    name, overrides = FAMILIES[family]
    path = make_tiny_family(tmp_path_factory.mktemp(family), name, **overrides)
    fast = qlora_rs.from_pretrained(path)
    plain = _without(fast, cpu_decode._FastRMSNorm, cpu_decode._FastMLP)
    done = fast.qlora_rs_cpu_decode
    assert (done.norms, done.mlps, done.attentions) == ((13 if family == "gemma3" else 5), 2, 2)
    activations = [m.forward.activation for m in fast.modules() if isinstance(m.__dict__.get("forward"), cpu_decode._FastMLP)]
    assert activations == ["gelu_tanh", "gelu_tanh"]
    calls = []
    real, tail = _lib.cpu_gated_mlp_4bit, _lib.cpu_decoder_tail
    monkeypatch.setattr(_lib, "cpu_gated_mlp_4bit", lambda *a: calls.append(a[7]) or real(*a))
    monkeypatch.setattr(_lib, "cpu_decoder_tail", lambda *a: calls.append(a[12]) or tail(*a))  # Gemma's layers: in there
    ids, steps = IDS[:1], STEPS[:, :1]  # one sequence: a row a step
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    got = _decode(fast, ids, steps, caches[0])
    assert calls == ["gelu_tanh"] * 2 * 5  # each step's, both layers (the prefill's rows take the module's ops)
    assert torch.equal(got, _decode(plain, ids, steps, caches[1]))
    _assert_same_caches(*caches)


def test_fast_attention_probe_refuses_other_rotary_embeddings(tmp_path, monkeypatch):
    """A class put on the list whose forward differs from the steps (GLM-4's rotary embeddings
    turn half of each head, pairs interleaved) fails its probe and keeps its forward."""
    monkeypatch.setattr(cpu_decode, "FAST_ATTENTION_CLASSES", cpu_decode.FAST_ATTENTION_CLASSES + ("Glm4Attention",))
    model = qlora_rs.from_pretrained(make_tiny_family(tmp_path, "Glm4"))
    assert model.qlora_rs_cpu_decode.attentions == 0
    assert not any(isinstance(m.__dict__.get("forward"), cpu_decode._FastAttention) for m in model.modules())


def test_fast_attention_steps_aside(tiny_dir, monkeypatch):
    """Training, autograd, a static cache and other attention implementations take the module's
    own forward; hooks on a projection still run; restore removes the forward."""
    model = qlora_rs.from_pretrained(tiny_dir)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.__dict__.get("forward"), cpu_decode._FastAttention)
    plain = _without_fast_attention(model)
    calls = []
    real = _lib.cpu_rotary
    monkeypatch.setattr(_lib, "cpu_rotary", lambda *a: calls.append(1) or real(*a))
    ids, steps = torch.tensor([[5, 9, 11, 4]]), torch.tensor([[12], [30]])

    static = [transformers.StaticCache(config=m.config, max_cache_len=16) for m in (model, plain)]
    assert torch.equal(_decode(model, ids, steps, static[0]), _decode(plain, ids, steps, static[1]))
    assert calls == []

    seen = []
    handle = attn.k_proj.register_forward_hook(lambda *a: seen.append(1))
    _decode(model, ids, steps, transformers.DynamicCache())
    assert len(calls) == 2 * 2 and len(seen) == 1 + 2  # the prefill's call and both steps'
    handle.remove()

    calls.clear()
    model.train()
    _decode(model, ids, steps, transformers.DynamicCache())
    model.eval()
    x = model.model.embed_tokens(torch.tensor([[3]])).detach().requires_grad_()
    cos, sin = model.model.rotary_emb(x, torch.tensor([[4]]))
    cache = transformers.DynamicCache()
    _decode(model, ids, [], cache)
    arg = "cache" if "cache" in inspect.signature(type(attn).forward).parameters else "past_key_values"
    out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, **{arg: cache})
    assert out.requires_grad and calls == []

    cpu_decode.restore(model)
    assert "forward" not in attn.__dict__


# ------------------------------------------------------------------ decoder layers


def _without_layer_steps(model):
    return _without(model, cpu_decode._FastDecoderLayer)


@pytest.fixture
def layer_steps(monkeypatch):
    """The decoder layers' one-token steps taken (one entry each: how their tail ran, "call" for
    the one Rust call, "steps" for the parts' steps), their probe's included."""
    calls = []
    real_tail, real_steps = cpu_decode._LayerPlan.tail, cpu_decode._LayerPlan._tail_steps

    def tail(self, attended, hidden):
        calls.append("call")
        return real_tail(self, attended, hidden)

    def steps(self, attended, hidden):
        calls[-1] = "steps"
        return real_steps(self, attended, hidden)

    monkeypatch.setattr(cpu_decode._LayerPlan, "tail", tail)
    monkeypatch.setattr(cpu_decode._LayerPlan, "_tail_steps", steps)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoder_layers_decode_as_their_own_forward(tiny_dir, dtype, layer_steps):
    """Prefill then five tokens, of one sequence and of two: the layers' steps give the logits and
    cache of their own forward bit for bit (whose parts take their steps too), in every decoding
    step of both layers and in no prefill (two sequences: the MLP by its module's forward)."""
    fast = qlora_rs.from_pretrained(tiny_dir, compute_dtype=dtype, dtype=dtype)
    assert fast.qlora_rs_cpu_decode.layers == 2
    plain = _without_layer_steps(fast)
    for ids, steps in ((IDS[:1], STEPS[:, :1]), (IDS, STEPS)):
        caches = [transformers.DynamicCache(), transformers.DynamicCache()]
        layer_steps.clear()  # the probe's, the last round's
        got = _decode(fast, ids, steps, caches[0])
        assert layer_steps == ["call" if ids.shape[0] == 1 else "steps"] * 2 * 5
        assert torch.equal(got, _decode(plain, ids, steps, caches[1]))
        _assert_same_caches(*caches)


def test_float32_layers_keep_their_forward(tiny_dir):
    """float32 MLPs keep their own forward (see _mlp_probe_agrees): so do their layers."""
    model = qlora_rs.from_pretrained(tiny_dir, compute_dtype=torch.float32, dtype=torch.float32)
    assert model.qlora_rs_cpu_decode.layers == 0


def test_decoder_layers_with_lora_adapters_decode_as_their_own_forward(tiny_dir, layer_steps):
    """LoRA layers on every projection, added after the first generation (the plans are gathered
    again): the same logits and cache as the layers' own forward, bit for bit; then writes into
    the adapters (as an optimizer's step) and into 4-bit weights' block scales, seen at the next
    token."""
    model = qlora_rs.from_pretrained(tiny_dir)
    ids, steps = IDS[:1], STEPS[:, :1]
    _decode(model, ids, steps, transformers.DynamicCache())
    plans = [layer.forward._plan for layer in model.model.layers]
    qlora_rs.add_lora(model, r=4, alpha=8, target_modules="all-linear")
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    plain = _without_layer_steps(model)
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    layer_steps.clear()
    got = _decode(model, ids, steps, caches[0])
    assert layer_steps == ["call"] * 2 * 5
    assert all(layer.forward._plan is not plan and layer.forward._plan.adapted
               for layer, plan in zip(model.model.layers, plans))
    assert torch.equal(got, _decode(plain, ids, steps, caches[1]))
    _assert_same_caches(*caches)

    # Writes between tokens, to both models alike.
    for m in (model, plain):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_A" in name:
                    p.mul_(1.5)
            down, q = m.model.layers[1].mlp.down_proj.base_layer, m.model.layers[0].self_attn.q_proj.base_layer
            down.weight_nested_absmax.mul_(0.5)
            q.weight_absmax.copy_(q.weight_absmax.flip(0))  # the double-quantized scales' codes
    kept = [layer.forward._plan.weights for layer in model.model.layers]
    got, want = _decode(model, ids, steps, caches[0]), _decode(plain, ids, steps, caches[1])
    assert torch.equal(got, want)  # the plain model's layers check their weights as they are called
    _assert_same_caches(*caches)
    now = [layer.forward._plan.weights for layer in model.model.layers]
    assert now[0][0] is not kept[0][0] and now[1][6] is not kept[1][6] and now[0][1:] == kept[0][1:]


def test_decoder_layers_step_aside(tiny_dir, layer_steps):
    """A hook on any part (a projection deep in the attention) runs, and the layer takes its own
    forward while it is there; autograd and training take it too, and so does a layer without one
    of its parts; copies and pickles drop the plan; restore removes the step."""
    model = qlora_rs.from_pretrained(tiny_dir)
    plain = _without_layer_steps(model)
    ids, steps = IDS[:1], STEPS[:, :1]
    layer_steps.clear()  # the probe's
    seen = []
    handle = model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda *a: seen.append(1))
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    got = _decode(model, ids, steps, caches[0])
    assert len(seen) == 1 + 5 and layer_steps == ["call"] * 5  # the first layer's steps only
    assert torch.equal(got, _decode(plain, ids, steps, caches[1]))
    handle.remove()
    layer_steps.clear()
    _decode(model, ids, steps, transformers.DynamicCache())
    assert layer_steps == ["call"] * 2 * 5

    layer_steps.clear()
    model.train()
    _decode(model, ids, steps, transformers.DynamicCache())
    model.eval()
    assert layer_steps == []
    layer = model.model.layers[0]
    x = model.model.embed_tokens(torch.tensor([[3]])).detach().requires_grad_()
    cos, sin = model.model.rotary_emb(x, torch.tensor([[4]]))
    cache = transformers.DynamicCache()
    _decode(model, ids, [], cache)
    layer_steps.clear()
    arg = "cache" if "cache" in inspect.signature(type(layer).forward).parameters else "past_key_values"
    out = layer(x, position_embeddings=(cos, sin), attention_mask=None, **{arg: cache})
    assert out.requires_grad and layer_steps == []

    assert layer.forward._plan is not None
    mlp = layer.mlp
    del layer.mlp  # a part gone: the layer's own forward (here: its error), not one of the step's
    with pytest.raises(AttributeError, match="mlp"):
        _decode(model, ids, steps, transformers.DynamicCache())
    layer.mlp = mlp
    copied = copy.deepcopy(layer)
    assert copied.forward._plan is None and copied.forward.module is copied
    assert pickle.loads(pickle.dumps(layer.forward)).module is not None
    cpu_decode.restore(model)
    assert "forward" not in layer.__dict__


def test_decoder_layers_of_other_families(family_dir, layer_steps):
    """Every family whose layers are of Llama's form or Gemma3's (four norms) takes the steps and
    decodes as its own forward, bit for bit (one sequence; a sliding window outgrown, SmolLM3's
    layer without rotary embeddings); Granite's layers (scaled residual sums) keep their forward."""
    fast = qlora_rs.from_pretrained(family_dir)
    family = type(fast.model.layers[0]).__name__
    expected = 0 if family == "GraniteDecoderLayer" else 2
    assert fast.qlora_rs_cpu_decode.layers == expected
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # each norm its own weights (a fresh model's are all alike)
        for name, p in fast.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0 if "Gemma" in family else 1))
    plain = _without_layer_steps(fast)
    ids, steps = IDS[:1], STEPS[:, :1]
    own = [transformers.DynamicCache(config=m.config) for m in (fast, plain)]
    layer_steps.clear()  # the probe's
    got = _decode(fast, ids, steps, own[0])
    assert layer_steps == ["call"] * expected * 5
    assert torch.equal(got, _decode(plain, ids, steps, own[1]))
    _assert_same_caches(*own)


def test_decoder_probe_refuses_scaled_residuals(tmp_path, monkeypatch):
    """Granite's layers put on the list: their forward scales the residual sums, the probe finds
    it and they keep their forward."""
    monkeypatch.setattr(cpu_decode, "FAST_DECODER_CLASSES", cpu_decode.FAST_DECODER_CLASSES + ("GraniteDecoderLayer",))
    name, overrides = FAMILIES["granite"]
    model = qlora_rs.from_pretrained(make_tiny_family(tmp_path, name, **overrides))
    assert model.qlora_rs_cpu_decode.attentions == 2 and model.qlora_rs_cpu_decode.layers == 0
    monkeypatch.setattr(cpu_decode, "_decoder_probe_agrees", lambda layer: ())
    cpu_decode.restore(model)
    assert cpu_decode.prepare(model).layers == 2  # the probe decides


def test_decoder_tail_adds_the_output_projections_bias(tmp_path, layer_steps):
    """Llama with ``attention_bias``: the one Rust call adds o_proj's bias (float32 here, rounded
    to bf16 first, as the layer adds it) and gives the layers' own bits."""
    model = qlora_rs.from_pretrained(make_tiny_family(tmp_path, "Llama", attention_bias=True))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            o = layer.self_attn.o_proj
            o.bias = nn.Parameter(torch.randn(o.out_features, generator=g), requires_grad=False)
    plain = _without_layer_steps(model)
    caches = [transformers.DynamicCache(), transformers.DynamicCache()]
    layer_steps.clear()
    got = _decode(model, IDS[:1], STEPS[:, :1], caches[0])
    assert layer_steps == ["call"] * 2 * 5
    assert torch.equal(got, _decode(plain, IDS[:1], STEPS[:, :1], caches[1]))
    _assert_same_caches(*caches)


def test_decoder_tail_names_bad_arguments(tiny_dir):
    """The Rust call checks what it is given and says what it expected."""
    model = qlora_rs.from_pretrained(tiny_dir)
    layer = model.model.layers[0]
    o = layer.self_attn.o_proj._cpu_kernel_weight()._weight
    gate, up, down = (p._cpu_kernel_weight()._weight for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    width = layer.self_attn.o_proj.out_features
    norm = layer.post_attention_layernorm.weight.detach()
    x = torch.randn(1, width, dtype=torch.bfloat16)
    args = dict(o_bias=None, o_adapter=None, norm_weight=norm, eps=1e-6, unit_offset=False, gate=gate, up=up, down=down,
                mlp_adapters=None, activation="silu")
    out = torch.empty(1, width, dtype=torch.bfloat16)
    _lib.cpu_decoder_tail(x, o, residual=x, out=out, **args)
    assert torch.isfinite(out.float()).all()
    with pytest.raises(qlora_rs.InvalidArgumentError, match="residual has 63 elements, expected 64"):
        _lib.cpu_decoder_tail(x, o, residual=x[:, :-1], out=out, **args)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="expected one dtype"):
        _lib.cpu_decoder_tail(x, o, residual=x.float(), out=out, **args)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="the MLP takes"):
        _lib.cpu_decoder_tail(x, o, residual=x, out=out, **{**args, "gate": down, "up": down})
    with pytest.raises(qlora_rs.InvalidArgumentError, match="out shares memory with cpu_decoder_tail: attended"):
        _lib.cpu_decoder_tail(x, o, residual=x, out=x, **args)
