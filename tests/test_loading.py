"""qlora_rs.from_pretrained: the three checkpoint kinds give the same model, bitsandbytes'
checkpoints give bitsandbytes' model, peak memory stays at the 4-bit model plus one tensor, and
bad checkpoints fail with the offending names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora_rs
from _convert_helpers import bnb_portable_path
from _loading_helpers import make_tiny_llama, tiny_llama_config, write_synthetic_checkpoint
from qlora_rs.errors import FormatError, InvalidArgumentError
from qlora_rs import from_pretrained, memory_footprint
from qlora_rs.io.checkpoint import Checkpoint

F32 = dict(compute_dtype=torch.float32, dtype=torch.float32)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("float") / "model")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    # More rows than the fused CPU kernel takes: the 4-bit layers decode and multiply as
    # bitsandbytes does, so logits can be compared with its bit for bit.
    from qlora_rs.core.ops import CPU_FUSED_GEMM_MAX_M

    return torch.randint(0, 160, (2, CPU_FUSED_GEMM_MAX_M // 2 + 4), generator=torch.Generator().manual_seed(1))


def reference_logits(model_dir: Path, tokens: torch.Tensor, **quant) -> torch.Tensor:
    """The float model quantized in place by quantize_model (the training issue's path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    qlora_rs.quantize_model(model, compute_dtype=torch.float32, **quant)
    with torch.no_grad():
        return model.eval()(tokens).logits


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_float_and_converted_checkpoints_give_the_same_model(float_dir, tokens, tmp_path):
    from qlora_rs.io.convert import convert_checkpoint

    ref = reference_logits(float_dir, tokens)
    a = from_pretrained(float_dir, **F32)
    assert a.qlora_rs_checkpoint["kind"] == "float"
    assert len(a.qlora_rs_checkpoint["quantized_modules"]) == 14  # 7 linear layers x 2 blocks; lm_head kept
    assert isinstance(a.model.layers[0].mlp.up_proj, qlora_rs.Linear4bit) and type(a.lm_head) is torch.nn.Linear
    convert_checkpoint(float_dir, tmp_path / "nf4", compute_dtype="float32")
    b = from_pretrained(tmp_path / "nf4", **F32)
    assert b.qlora_rs_checkpoint["kind"] == "4bit"
    assert b.qlora_rs_checkpoint["quantization"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                                     "compute_dtype": "float32"}
    assert torch.equal(logits(a, tokens), ref)
    assert torch.equal(logits(b, tokens), ref)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_options_of_a_float_checkpoint(float_dir, tokens):
    model = from_pretrained(float_dir, quantization={"quant_type": "fp4", "double_quant": False, "blocksize": 128}, **F32)
    layer = model.model.layers[1].self_attn.o_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("fp4", 128, False)
    assert torch.equal(logits(model, tokens), reference_logits(float_dir, tokens, quant_type="fp4", double_quant=False, blocksize=128))
    plain = from_pretrained(float_dir, quantization=False, **F32)
    assert not any(isinstance(m, qlora_rs.Linear4bit) for m in plain.modules())
    assert model.training is False and plain.qlora_rs_checkpoint["quantization"] is None


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_matches_bitsandbytes(float_dir, tokens, tmp_path, quant_type, double_quant):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    bnb_model = AutoModelForCausalLM.from_pretrained(str(float_dir), quantization_config=config, dtype=torch.float32,
                                                     device_map="cpu")
    bnb_portable_path(bnb_model)
    bnb_model.save_pretrained(str(tmp_path / "bnb"))
    ours = from_pretrained(tmp_path / "bnb", **F32)
    assert ours.qlora_rs_checkpoint["quantization"]["quant_type"] == quant_type
    assert ours.model.layers[0].self_attn.q_proj.double_quant is double_quant
    assert torch.equal(logits(ours, tokens), logits(bnb_model, tokens))


def test_sharded_tied_checkpoint(tmp_path, tokens):
    src = make_tiny_llama(tmp_path / "tied", tie=True, seed=3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(tmp_path / "sharded")
    assert len(ckpt.files) > 2 and "lm_head.weight" not in ckpt
    model = from_pretrained(tmp_path / "sharded", **F32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, tokens), reference_logits(src, tokens))


def test_buffers_are_computed_not_read(float_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = from_pretrained(float_dir, **F32)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(float_dir)))
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_mismatched_tensors_are_named(float_dir, tmp_path):
    missing = _edit_checkpoint(float_dir, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(FormatError, match=r"lacks tensors of LlamaForCausalLM: model\.layers\.1\.mlp\.down_proj\.weight"):
        from_pretrained(missing)
    extra = _edit_checkpoint(float_dir, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(FormatError, match=r"does not have: model\.extra\.weight"):
        from_pretrained(extra)
    shape = _edit_checkpoint(float_dir, tmp_path / "shape",
                             lambda t: t.update({"model.norm.weight": torch.ones(65, dtype=torch.bfloat16)}))
    with pytest.raises(FormatError, match=r"model\.norm\.weight has shape \[65\]; LlamaForCausalLM expects \[64\]"):
        from_pretrained(shape)
    lax = from_pretrained(missing, strict=False, **F32)  # initialized as transformers would
    assert lax.model.layers[1].mlp.down_proj.weight.device.type == "cpu"
    assert from_pretrained(extra, strict=False, **F32) is not None


def test_checkpoints_that_transformers_converts_are_named_as_such(float_dir, tmp_path):
    """transformers 5 saves a MoE model's fused experts as one tensor per expert and joins them on
    load; this loader does not, and its error says so (and only for such models)."""
    from _loading_helpers import make_tiny_family

    moe = make_tiny_family(tmp_path / "moe", "Qwen3Moe", num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
    with pytest.raises(FormatError, match=r"does not have: model\.layers\.0\.mlp\.experts\.0\..*transformers "
                                          r"converts Qwen3MoeForCausalLM checkpoints as it loads them"):
        from_pretrained(moe)
    extra = _edit_checkpoint(float_dir, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(FormatError) as error:
        from_pretrained(extra)
    assert "converts" not in str(error.value)


def test_quantized_checkpoint_keeps_its_format(float_dir, tmp_path):
    from qlora_rs.io.convert import convert_checkpoint

    convert_checkpoint(float_dir, tmp_path / "nf4")
    with pytest.raises(InvalidArgumentError, match=r"already quantized \(nf4, blocksize 64, double_quant=True\) but "
                                                   r"quantization asks for fp4"):
        from_pretrained(tmp_path / "nf4", quantization="fp4")
    with pytest.raises(InvalidArgumentError, match="quantization=False would need the float weights"):
        from_pretrained(tmp_path / "nf4", quantization=False)
    with pytest.raises(InvalidArgumentError, match="quantization='nf5' is not supported"):
        from_pretrained(float_dir, quantization="nf5")


def test_unreadable_directories(tmp_path, float_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((float_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json; it has "
                                                r"pytorch_model.bin \(pickle formats are not read"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FormatError, match="not a safetensors file"):
        from_pretrained(tmp_path)


def test_real_minilm_encoder_loads_as_bert(tokens):
    from transformers import AutoModel, AutoTokenizer

    from qlora_rs.models import minilm_dir

    path = minilm_dir()
    ours = from_pretrained(path, **F32)
    assert type(ours).__name__ == "BertModel" and ours.qlora_rs_checkpoint["kind"] == "float"
    ref = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    qlora_rs.quantize_model(ref, compute_dtype=torch.float32)
    enc = AutoTokenizer.from_pretrained(str(path))(["a sentence to embed", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours(**enc).last_hidden_state, ref.eval()(**enc).last_hidden_state)


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from qlora_rs import from_pretrained, memory_footprint
    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out
    from_pretrained(sys.argv[2])  # imports and builds everything once
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status()
    model = from_pretrained(sys.argv[1], compute_dtype=torch.bfloat16)
    after = status()
    print(json.dumps({"before": before["VmRSS"], "peak": after["VmHWM"], "model": memory_footprint(model).bytes_now}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_peak_memory_is_the_4bit_model_plus_one_tensor(tmp_path, float_dir):
    # float32 weights: the checkpoint is 8x the 4-bit model and several times the bound below.
    config = tiny_llama_config(vocab=256, hidden=1024, layers=6, intermediate=2816, heads=8, kv_heads=8)
    size = write_synthetic_checkpoint(tmp_path / "big", config, dtype=torch.float32)
    largest = 1024 * 2816 * 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big"), str(float_dir)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    bound = r["model"] + 2 * largest + (16 << 20)
    growth = r["peak"] - r["before"]
    print(f"checkpoint {size / 2**20:.0f} MiB, 4-bit model {r['model'] / 2**20:.1f} MiB, peak growth "
          f"{growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert size > 3 * bound
    assert growth < bound


@pytest.mark.gpu
def test_loads_onto_cuda(float_dir, tokens):
    cpu = from_pretrained(float_dir, **F32)
    gpu = from_pretrained(float_dir, device="cuda", **F32)
    assert all(t.device.type == "cuda" for t in [*gpu.parameters(), *gpu.buffers()])
    assert torch.allclose(logits(gpu, tokens.cuda()).cpu(), logits(cpu, tokens), atol=1e-4, rtol=1e-4)
    assert memory_footprint(gpu).bytes_now == memory_footprint(cpu).bytes_now
