"""transformers' own from_pretrained with ``quantization_config=qlora_rs.QloraConfig(...)``:
quantizes float checkpoints, reads 4-bit ones, and what it saves loads back the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qlora_rs
from _loading_helpers import make_tiny_llama
from qlora_rs.errors import InvalidArgumentError
from qlora_rs.io.hf_quantizer import QloraConfig
from qlora_rs import from_pretrained


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("hfq") / "model", seed=5)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(2))


def hf_load(path, **config):
    from transformers import AutoModelForCausalLM

    config.setdefault("compute_dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=QloraConfig(**config), dtype=torch.float32)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_quantizes_a_float_checkpoint_like_qlora_rs(float_dir, tokens):
    model = hf_load(float_dir, quant_type="nf4", double_quant=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, qlora_rs.Linear4bit) and q.double_quant and q.quant_type == "nf4"
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays, as with bitsandbytes
    ours = from_pretrained(float_dir, compute_dtype=torch.float32, dtype=torch.float32)
    assert torch.equal(logits(model, tokens), logits(ours, tokens))
    fp4 = hf_load(float_dir, quant_type="fp4", double_quant=False, blocksize=128)
    layer = fp4.model.layers[1].mlp.down_proj
    assert (layer.quant_type, layer.double_quant, layer.blocksize) == ("fp4", False, 128)


def test_saved_model_loads_back_through_the_same_call(float_dir, tokens, tmp_path):
    model = hf_load(float_dir)
    model.save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    # bitsandbytes' own config: the checkpoint stays loadable by transformers + bitsandbytes.
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True
    again = hf_load(tmp_path / "saved")
    assert torch.equal(logits(again, tokens), logits(model, tokens))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # ... and by qlora_rs' own loader.
    ours = from_pretrained(tmp_path / "saved", compute_dtype=torch.float32, dtype=torch.float32)
    assert torch.equal(logits(ours, tokens), logits(model, tokens))


def test_converted_checkpoint_loads_through_the_same_call(float_dir, tokens, tmp_path):
    from qlora_rs.io.convert import convert_checkpoint

    convert_checkpoint(float_dir, tmp_path / "nf4", compute_dtype="bfloat16")
    model = hf_load(tmp_path / "nf4")  # the caller's compute dtype (float32) wins over the file's
    assert model.model.layers[0].mlp.gate_proj.compute_dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ours = from_pretrained(tmp_path / "nf4", compute_dtype=torch.float32, dtype=torch.float32)
    assert torch.equal(logits(model, tokens), logits(ours, tokens))


def test_trains_with_lora(float_dir, tokens):
    model = hf_load(float_dir)
    qlora_rs.add_lora(model, r=4, dropout=0.0)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_config_dicts():
    c = QloraConfig.from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                               "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                               "llm_int8_skip_modules": ["lm_head"]})
    assert (c.quant_type, c.double_quant, c.compute_dtype, c.skip_modules) == ("nf4", True, torch.bfloat16, ["lm_head"])
    assert QloraConfig.from_dict(c.to_dict()).options() == c.options()
    with pytest.raises(InvalidArgumentError, match="quant_type 'nf3' is not supported"):
        QloraConfig(quant_type="nf3")
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) \['double_quantization'\]"):
        QloraConfig(double_quantization=True)
    with pytest.raises(InvalidArgumentError, match="8-bit"):
        QloraConfig.from_dict({"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from qlora_rs.io.hf_quantizer import QloraHfQuantizer

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qlora_rs"] is QloraConfig
    assert AUTO_QUANTIZER_MAPPING["qlora_rs"] is QloraHfQuantizer
