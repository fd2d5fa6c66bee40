"""``qlora-rs merge``: the adapter folded into the decoded 4-bit base, written as a checkpoint plain
transformers loads (16-bit), or quantized again (--requantize)."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_rs
from _loading_helpers import make_tiny_llama
from qlora_rs.cli.merge import merge_checkpoint
from qlora_rs import from_pretrained


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tied-embedding Llama and a LoRA adapter with non-zero weights on all its linear layers."""
    d = tmp_path_factory.mktemp("merge")
    base = make_tiny_llama(d / "base", tie=True, seed=7)
    model = from_pretrained(base, compute_dtype=torch.float32, dtype=torch.float32)
    qlora_rs.add_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in qlora_rs.surgery.model.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    qlora_rs.save_adapter(model, d / "adapter")
    tokens = torch.randint(0, 160, (2, 8), generator=g)
    with torch.no_grad():
        expected = model.eval()(tokens).logits
    return base, d / "adapter", tokens, expected


def test_merged_checkpoint_loads_in_plain_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, tokens, expected = trained
    r = merge_checkpoint(base, adapter, tmp_path / "merged")
    assert r["layers"] == 14 and r["dtype"] == "bfloat16" and r["relative_rms"] < 1e-2
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        got = plain(tokens).logits
    # The only loss is rounding the merged weights to bfloat16.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9999


def test_requantized_checkpoint(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_rs.io.hf_quantizer import QloraConfig

    base, adapter, tokens, expected = trained
    r = merge_checkpoint(base, adapter, tmp_path / "q", requantize=True)
    assert 1e-3 < r["relative_rms"] < 0.15  # NF4's own error on the merged weights
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    ours = from_pretrained(tmp_path / "q", compute_dtype=torch.float32, dtype=torch.float32)
    assert ours.qlora_rs_checkpoint["kind"] == "4bit"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32,
                                              quantization_config=QloraConfig(compute_dtype=torch.float32))
    with torch.no_grad():
        a, b = ours(tokens).logits, hf(tokens).logits
    assert torch.equal(a, b)
    # A second 4-bit rounding on top of the trained model: close, not equal (this model is tiny and random).
    assert torch.nn.functional.cosine_similarity(a.flatten(), expected.flatten(), dim=0) > 0.9


def test_cli_merge(trained, tmp_path, capsys):
    from qlora_rs.cli import main

    base, adapter, _, _ = trained
    out = tmp_path / "m"
    assert main(["merge", str(base), str(adapter), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "merged     14 LoRA layers" in text and "loads with transformers' from_pretrained" in text
    assert main(["merge", str(base), str(adapter), "-o", str(out)]) == 1
    assert "already exists (pass --force" in capsys.readouterr().err
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--force"]) == 0
    assert main(["merge", str(base), str(tmp_path), "-o", str(tmp_path / "x")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_keeps_the_model_runnable_in_its_own_dtype(trained, dtype):
    """qlora_rs.merge on a model loaded in float32 from a bf16 checkpoint: the merged layers take the
    model's dtype (not the checkpoint's), so it runs and computes what it computed with the adapter."""
    base, adapter, tokens, expected = trained
    model = from_pretrained(base, compute_dtype=dtype, dtype=dtype)
    qlora_rs.load_adapter(model, adapter, lora_dtype=dtype)
    with torch.no_grad():
        before = model.eval()(tokens).logits.float()
    qlora_rs.merge(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        after = model(tokens).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    else:  # one rounding of the merged weights to bf16
        assert (after - before).abs().max() < 0.05 * before.abs().max()
