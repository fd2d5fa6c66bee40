"""qlora_rs against PEFT + bitsandbytes on CPU: same logits and LoRA gradients from the same
packed weights and adapters; adapters round-trip both ways through PEFT's on-disk layout;
``peft.get_peft_model`` on a model quantized by qlora_rs trains (and merges with
``qlora_rs.io.peft_integration.register``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qlora_rs

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
from _lora_helpers import one_torch_thread, randomize_lora, tiny_llama, to_bnb, tokens, train_lm  # noqa: E402, F401
from qlora_rs.io.peft_integration import PeftLoraLinear4bit, register  # noqa: E402


def _peft_grads(model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in model.named_parameters() if p.requires_grad
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(qlora_rs model with random adapters, the same under PEFT on bitsandbytes loaded from
    save_adapter's output, the adapter directory)."""
    ours = qlora_rs.quantize_model(tiny_llama())
    theirs_base = to_bnb(ours)
    qlora_rs.add_lora(ours, r=8, alpha=16, dropout=0.0)
    randomize_lora(ours)
    directory = tmp_path_factory.mktemp("adapter")
    qlora_rs.save_adapter(ours, directory)
    theirs = peft.PeftModel.from_pretrained(theirs_base, directory, is_trainable=True)
    return ours, theirs, directory


def test_same_logits_and_lora_gradients_as_peft_on_bitsandbytes(pair):
    ours, theirs, _ = pair
    ours.train()
    theirs.train()
    ids = tokens()
    ours.zero_grad()
    theirs.zero_grad()
    a, b = ours(ids).logits, theirs(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    assert _rel(a, b) < 1e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    target = tokens(seed=9)
    loss = lambda logits: torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())  # noqa: E731
    loss(a).backward()
    loss(b).backward()
    ga = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    gb = _peft_grads(theirs)
    assert ga.keys() == gb.keys() and len(ga) == 28
    for n in ga:
        assert _rel(ga[n], gb[n]) < 3e-2, n


def test_saved_adapter_has_peft_layout(pair):
    ours, _, directory = pair
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, False)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    assert len(tensors) == 28
    loaded = peft.PeftConfig.from_pretrained(str(directory))
    assert loaded.r == 8 and set(loaded.target_modules) == set(config["target_modules"])


def test_peft_saved_adapter_loads_with_load_adapter(tmp_path):
    base = qlora_rs.quantize_model(tiny_llama())
    theirs = to_bnb(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(theirs, config)
    theirs.save_pretrained(tmp_path)
    ours = qlora_rs.load_adapter(copy.deepcopy(base), tmp_path)
    assert len(qlora_rs.surgery.model.lora_layers(ours)) == 6
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())
    ids = tokens()
    with torch.no_grad():
        a, b = ours.eval()(ids).logits, theirs.eval()(ids).logits
        plain = base.eval()(ids).logits
    assert _rel(a, b) < 1e-2 and _rel(plain, b) > 5 * _rel(a, b)  # the adapter matters, and matches


def test_load_adapter_errors(tmp_path):
    model = qlora_rs.quantize_model(tiny_llama())
    qlora_rs.add_lora(model, r=2, target_modules=["q_proj"])
    qlora_rs.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(qlora_rs.FormatError, match="use_dora=True is not supported"):
        qlora_rs.load_adapter(qlora_rs.quantize_model(tiny_llama()), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(qlora_rs.FormatError, match=r"names layers this model lacks: \['model.layers.1.self_attn.q_proj'\]"):
        qlora_rs.load_adapter(other, tmp_path)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="no LoRA layers"):
        qlora_rs.save_adapter(tiny_llama(), tmp_path / "none")


def test_get_peft_model_on_a_qlora_rs_model_trains():
    model = qlora_rs.quantize_model(tiny_llama())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    wrapped = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, qlora_rs.Linear4bit)
    assert "lm_head" not in {n.split(".")[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    losses = train_lm(pm, steps=5)
    assert losses[-1] < losses[0] - 0.05, losses


def test_registered_peft_layer_adds_the_share_as_lora_linear4bit_does(monkeypatch):
    """CPU inference of few rows: the share by the Rust call, the same bits as qlora-rs's own
    LoRA layer with the same adapter; copies still work after it (the held adapters stay behind)."""
    from qlora_rs import _lib

    model = qlora_rs.quantize_model(tiny_llama())
    ours = copy.deepcopy(model)
    qlora_rs.add_lora(ours, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    randomize_lora(ours)
    config = register(peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            if "lora_" in name:
                peft_name = name.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")
                pm.get_parameter("base_model.model." + peft_name).copy_(value)
    calls = []
    real = _lib.cpu_lora_add
    monkeypatch.setattr(_lib, "cpu_lora_add", lambda *a: calls.append(1) or real(*a))
    ids = tokens()[:1, :6]
    with torch.no_grad():
        got, want = pm.eval()(ids).logits, ours.eval()(ids).logits
    assert len(calls) == 2 * 14 and torch.equal(got, want)
    copy.deepcopy(pm)


def test_registered_peft_layer_is_fused_and_merges(monkeypatch):
    import qlora_rs.io.peft_integration as integration

    calls = []
    fused_fn = integration.LoraLinear4bitFunction

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return fused_fn.apply(*args)

    monkeypatch.setattr(integration, "LoraLinear4bitFunction", Counting)
    model = qlora_rs.quantize_model(tiny_llama())
    # PEFT's generic layer, asked for explicitly (by default PEFT now picks PeftLoraLinear4bit).
    generic_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    generic_config._register_custom_module({qlora_rs.Linear4bit: peft.tuners.lora.layer.Linear})
    plain = peft.get_peft_model(copy.deepcopy(model), generic_config)
    config = register(peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    pm = peft.get_peft_model(model, config)
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, PeftLoraLinear4bit)
    pm.load_state_dict(plain.state_dict())
    ids = tokens()
    with torch.no_grad():
        fused, generic = pm.eval()(ids).logits, plain.eval()(ids).logits
    # Inference takes the base's CPU kernels and adds the share itself: no autograd function.
    assert _rel(fused, generic) < 1e-2 and calls == []
    with torch.enable_grad():
        assert pm(ids).logits.requires_grad  # a graph to record: the autograd function
    assert len(calls) == 14
    losses = train_lm(pm, steps=3)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = pm.eval()(ids).logits
        with pytest.warns(qlora_rs.surgery.model.MergeRoundingWarning, match="re-quantized"):
            merged = pm.merge_and_unload()
        after = merged(ids).logits
    assert isinstance(merged.model.layers[0].mlp.up_proj, qlora_rs.Linear4bit)
    assert _rel(after, before) < 0.1
