"""quantize_model / add_lora / prepare_for_training / merge on a tiny transformers Llama and on
plain torch models: what gets replaced, frozen and reported, training, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_rs
from qlora_rs import InvalidArgumentError, Linear4bit, LoraLinear, LoraLinear4bit

pytest.importorskip("transformers")
from _lora_helpers import one_torch_thread, randomize_lora, tiny_llama, tokens, train_lm  # noqa: E402, F401

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_quantize_model_replaces_linears_but_lm_head():
    model = qlora_rs.quantize_model(tiny_llama())
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") is nn.Linear
    assert len(kinds) == 2 * len(PROJ) and set(kinds.values()) == {Linear4bit}
    layer = model.model.layers[0].self_attn.q_proj
    assert layer._qlora_name == "model.layers.0.self_attn.q_proj" and layer.weight_dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(tokens()).logits
    assert torch.isfinite(logits).all()


def test_quantize_model_options_skip_and_tied_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 64))
    model[2].weight = nn.Parameter(model[0].weight.data[:, :32].clone())
    head = nn.Linear(64, 10)
    emb = nn.Embedding(10, 64)
    head.weight = emb.weight  # tied, like an lm_head
    model.append(head)
    model.append(emb)
    qlora_rs.quantize_model(model, skip=("1",), quant_type="fp4", blocksize=128, double_quant=False)
    assert isinstance(model[0], Linear4bit) and model[0].quant_type == "fp4" and not model[0].double_quant
    assert type(model[1]) is nn.Linear and isinstance(model[2], Linear4bit)
    assert type(model[3]) is nn.Linear and model[3].weight is emb.weight


def test_add_lora_targets_freezing_and_summary():
    model = qlora_rs.quantize_model(tiny_llama())
    summary = qlora_rs.add_lora(model, r=4, alpha=8, dropout=0.0)
    assert len(summary.modules) == 2 * len(PROJ) and "lm_head" not in summary.modules
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{ab}.weight" for m in summary.modules for ab in ("lora_A", "lora_B")}
    expected = sum(4 * (m.in_features + m.out_features) for m in qlora_rs.surgery.model.lora_layers(model).values())
    assert summary.trainable == expected
    assert 0 < summary.percent < 100 and "trainable params" in str(summary)
    assert summary.config["target_modules"] == sorted(PROJ)
    assert isinstance(model.model.layers[1].mlp.down_proj, LoraLinear4bit)

    listed = qlora_rs.quantize_model(tiny_llama())
    s = qlora_rs.add_lora(listed, r=2, target_modules=["q_proj", "v_proj"])
    assert len(s.modules) == 4 and all(m.endswith(("q_proj", "v_proj")) for m in s.modules)
    regex = qlora_rs.quantize_model(tiny_llama())
    s = qlora_rs.add_lora(regex, r=2, target_modules=r"model\.layers\.0\.mlp\..*")
    assert s.modules == [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]


def test_add_lora_on_plain_linears_uses_lora_linear():
    model = tiny_llama()
    qlora_rs.add_lora(model, r=2, target_modules=["o_proj"])
    assert isinstance(model.model.layers[0].self_attn.o_proj, LoraLinear)


def test_add_lora_unmatched_target_lists_available_layers():
    model = qlora_rs.quantize_model(tiny_llama())
    with pytest.raises(InvalidArgumentError, match=r"target\(s\) \['qkv_proj'\] match no linear layer; available "
                                                   r"linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        qlora_rs.add_lora(model, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(InvalidArgumentError, match=r"'attn\\\\\.qkv' matches no linear layer; available"):
        qlora_rs.add_lora(model, target_modules=r"attn\.qkv")
    with pytest.raises(InvalidArgumentError, match="not a valid regex"):
        qlora_rs.add_lora(model, target_modules="q_proj(")


def test_training_reduces_the_loss():
    model = qlora_rs.quantize_model(tiny_llama())
    qlora_rs.add_lora(model, r=8, alpha=16, dropout=0.05)
    model.train()
    losses = train_lm(model, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = qlora_rs.quantize_model(tiny_llama())
        qlora_rs.add_lora(model, r=4, dropout=0.1)
        randomize_lora(model)
        qlora_rs.prepare_for_training(model, gradient_checkpointing=checkpointing)
        model.train()
        torch.manual_seed(5)
        ids = tokens()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * len(PROJ)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_prepare_for_training_options():
    model = qlora_rs.quantize_model(tiny_llama())
    qlora_rs.prepare_for_training(model, gradient_checkpointing=False, fp32_norms=True)
    assert model.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(InvalidArgumentError, match="has no gradient_checkpointing_enable"):
        qlora_rs.prepare_for_training(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_folds_adapters(requantize):
    model = qlora_rs.quantize_model(tiny_llama())
    qlora_rs.add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_lora(model)
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits.float()
    if requantize:
        with pytest.warns(qlora_rs.surgery.model.MergeRoundingWarning, match="re-quantized"):
            report = qlora_rs.merge(model, requantize=requantize)
    else:
        report = qlora_rs.merge(model, requantize=requantize)
    assert len(report) == 2 * len(PROJ) and not qlora_rs.surgery.model.lora_layers(model)
    kind = Linear4bit if requantize else nn.Linear
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is kind and (requantize or layer.weight.dtype == torch.bfloat16)
    err = report["model.layers.0.self_attn.q_proj"]
    assert 0 < err.relative_rms < (0.15 if requantize else 0.01)
    with torch.no_grad():
        after = model(ids).logits.float()
    rel = (after - before).norm() / before.norm()
    assert rel < (0.2 if requantize else 0.02), rel.item()


def test_lora_on_a_plain_module_and_copy():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    qlora_rs.quantize_model(model, skip=())
    summary = qlora_rs.add_lora(model, r=2, target_modules="all-linear")
    assert summary.modules == ["0", "2"]
    clone = copy.deepcopy(model)
    x = torch.randn(3, 32)
    assert torch.equal(clone.eval()(x), model.eval()(x))
