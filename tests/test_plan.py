"""`qlora-rs plan` / `qlora_rs.plan`: the weight and LoRA figures against the bytes `qlora-rs convert`
writes and the models qlora_rs loads; the activation and total figures against the memory a
training step really allocates (CPU allocator reports; `torch.cuda.max_memory_allocated` on a GPU)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

import qlora_rs
from qlora_rs.cli import main
from qlora_rs.errors import InvalidArgumentError
from qlora_rs.training.memory_measure import measure_training_step
from qlora_rs.training.memory_plan import METHODS, count_model, parse_bytes, plan

DATA = Path(__file__).parent / "data"
SMOLLM2 = DATA / "smollm2-135m-instruct.config.json"
LLAMA_65B = DATA / "llama-65b.config.json"


def llama(**kw) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4000,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


def _data_bytes(directory: Path) -> tuple[int, dict[str, bytes]]:
    """Tensor-data bytes of the safetensors files of a model directory (headers excluded), and
    the JSON quantization states they hold."""
    total, states = 0, {}
    for f in sorted(directory.glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            total += end - start
            if ".quant_state.bitsandbytes__" in name:
                states[name] = raw[8 + n + start:8 + n + end]
    return total, states


# ----------------------------------------------------------------------------------------------
# Weights and LoRA: exact


def _save_random(cfg: dict, directory: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "cfg, blocksize, double_quant, targets",
    [
        # Partial 4-bit blocks (68 x 300) and several nested double-quant blocks; grouped-query attention.
        (llama(hidden_size=68, intermediate_size=300, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=256), 64, True, "all-linear"),
        # Tied embeddings, float32 block scales, block 128, LoRA on two projections only.
        (llama(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=320, tie_word_embeddings=True), 128, False, ["q_proj", "v_proj"]),
        # Qwen2: biases on q/k/v (kept in 16 bits beside the 4-bit weights).
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
          "max_position_embeddings": 128, "tie_word_embeddings": False}, 32, True, "all-linear"),
    ],
    ids=["llama-partial-blocks", "llama-tied-no-dq", "qwen2-biases"],
)
def test_weight_and_lora_figures_are_the_converted_checkpoints(tmp_path, cfg, blocksize, double_quant, targets):
    src = _save_random(cfg, tmp_path / "src")
    dst = tmp_path / "dst"
    summary = qlora_rs.convert_checkpoint(src, dst, blocksize=blocksize, double_quant=double_quant)
    counts = count_model(src, r=8, target_modules=targets, blocksize=blocksize, double_quant=double_quant)
    _check_counts(counts, src, dst, summary, blocksize, double_quant, targets)


def test_weight_figures_of_the_real_smollm2(tmp_path, smollm2_dir):
    dst = tmp_path / "smollm2-nf4"
    summary = qlora_rs.convert_checkpoint(smollm2_dir, dst)
    counts = count_model(smollm2_dir, r=8)
    _check_counts(counts, smollm2_dir, dst, summary, 64, True, "all-linear")
    # The config in tests/data (used by the activation tests and the README) is that model's.
    mine = count_model(SMOLLM2, r=8)
    assert (mine.params, mine.bytes_4bit, mine.checkpoint_bytes_4bit, mine.lora_params) == (
        counts.params, counts.bytes_4bit, counts.checkpoint_bytes_4bit, counts.lora_params)


def _check_counts(counts, src: Path, dst: Path, summary, blocksize: int, double_quant: bool, targets) -> None:
    from qlora_rs import memory_footprint

    assert counts.params == summary.params_quantized + summary.params_kept
    assert counts.quantized_params == summary.params_quantized

    # On disk: the 16-bit source exactly; the 4-bit output exactly once the JSON states' offsets,
    # counted as 19 characters, are counted as printed.
    src_bytes, _ = _data_bytes(src)
    assert counts.checkpoint_bytes_16bit == src_bytes
    dst_bytes, states = _data_bytes(dst)
    assert len(states) == summary.tensors_quantized
    offset_digits = 0
    for raw in states.values():
        state = json.loads(raw)
        if double_quant:
            offset_digits += len(json.dumps(state["nested_offset"])) - 19
    assert counts.checkpoint_bytes_4bit + offset_digits == dst_bytes

    # The format, from the linear shapes alone: packed nibbles, 8-bit (or float32) block scales,
    # float32 second-level scales per 256 blocks, and the code tables.
    shapes = [(lin.in_features, lin.out_features) for lin in counts.linears if lin.quantized]
    assert len(shapes) == summary.tensors_quantized
    blocks = [math.ceil(i * o / blocksize) for i, o in shapes]
    parts = counts.bytes_4bit_parts
    assert parts["packed"] == sum((i * o + 1) // 2 for i, o in shapes)
    assert parts["absmax"] == sum(blocks) * (1 if double_quant else 4)
    assert parts["nested_absmax"] == (sum(4 * math.ceil(b / 256) for b in blocks) if double_quant else 0)
    assert parts["quant_maps"] == len(shapes) * 4 * (16 + (256 if double_quant else 0))

    # In memory: what qlora_rs loads, 4-bit and 16-bit.
    loaded = qlora_rs.from_pretrained(dst)
    assert counts.bytes_4bit == memory_footprint(loaded).bytes_now
    assert counts.bytes_16bit == memory_footprint(qlora_rs.from_pretrained(src, quantization=False)).bytes_now
    summary_lora = qlora_rs.add_lora(loaded, r=8, target_modules=targets)
    assert counts.lora_params == summary_lora.trainable
    assert counts.lora_bytes == sum(p.numel() * p.element_size() for p in loaded.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Activations and totals: against measurement


# (config, options): each stresses another term: the layers' saved tensors, a layer's LoRA
# transients (wide MLP, tiny vocabulary) under gradient checkpointing with padding, and a large
# vocabulary's logits (SmolLM2's widths, heads and 49152-token vocabulary, 3 of its 30 layers to
# keep the test short; benches/plan_validate.py measures all 30).
MEASURED = [
    pytest.param(llama(), dict(batch=2, seq=128, gradient_checkpointing=False, padding=False), id="tiny-llama"),
    pytest.param(llama(intermediate_size=2048, vocab_size=256), dict(batch=2, seq=96, gradient_checkpointing=True,
                                                                      padding=True), id="wide-mlp-checkpointed"),
    pytest.param({**json.loads(SMOLLM2.read_text()), "num_hidden_layers": 3},
                 dict(batch=1, seq=64, gradient_checkpointing=False, padding=True), id="smollm2-3-layers"),
]


@pytest.fixture
def one_thread():
    # Memory does not depend on it; the time does: on a shared 2-core machine torch's thread pool
    # spends most of a small step waiting for busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cfg, options", MEASURED)
def test_activation_and_total_figures_match_a_measured_step(one_thread, cfg, options):
    from qlora_rs.core.ops import matmul_dtype

    mm = matmul_dtype(torch.bfloat16, torch.device("cpu"))
    predicted = plan(cfg, r=8, optimizer="paged_adamw", matmul_dtype=mm, **options)
    measured = measure_training_step(cfg, "qlora", r=8, optimizer="paged_adamw", **options)
    # Counted, not modelled: exact.
    assert measured["weights"] == predicted.weights_bytes["qlora"]
    assert measured["lora"] == predicted.lora_bytes["qlora"]
    assert measured["optimizer"] == predicted.optimizer_bytes["qlora"]
    assert measured["gradients"] == predicted.gradient_bytes["qlora"]
    # Modelled: within 15%.
    for key, figure in (("activations", predicted.activation_bytes), ("total", predicted.total_bytes)):
        ratio = figure["qlora"] / measured[key]
        assert abs(ratio - 1) < 0.15, f"{key}: predicted {figure['qlora']:,} vs measured {measured[key]:,} ({ratio:.3f})"


@pytest.mark.gpu
def test_activation_figures_match_cuda_max_memory_allocated():
    if not qlora_rs.build_info()["cuda_kernels"]:
        pytest.skip("built without the CUDA kernels: the pure-torch decode allocates differently")
    cfg, options = llama(), dict(batch=4, seq=256, gradient_checkpointing=True, padding=True)
    predicted = plan(cfg, r=16, **options)
    measured = measure_training_step(cfg, "qlora", r=16, device="cuda", **options)
    assert measured["weights"] == predicted.weights_bytes["qlora"]
    for key, figure in (("activations", predicted.activation_bytes), ("total", predicted.total_bytes)):
        assert abs(figure["qlora"] / measured[key] - 1) < 0.15, (key, figure["qlora"], measured[key])


# ----------------------------------------------------------------------------------------------
# The plan's arithmetic


def test_the_65b_row_reproduces_the_papers_claims():
    p = plan(LLAMA_65B, gpu="48GB")
    c = p.counts
    assert c.params == 65_285_660_672
    # Full 16-bit fine-tuning: 16-bit weights and gradients and two float32 Adam states, >780 GB.
    assert p.total_bytes["full_16bit"] > 780e9
    # NF4 with double quantization: 4 + 8/64 + 32/(64*256) bits per quantized weight (plus the tables).
    parts = c.bytes_4bit_parts
    bits = 8 * (parts["packed"] + parts["absmax"] + parts["nested_absmax"]) / c.quantized_params
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    # QLoRA fits a 48 GB GPU (the paper's claim); the 16-bit methods do not.
    assert p.fits_with_paging["qlora"] and not p.fits_with_paging["lora_16bit"]
    assert not p.fits["full_16bit"]


def test_largest_batch_and_sequence_are_the_edges_of_fitting():
    counts = count_model(llama(), r=8)
    gpu = 120 * 10**6
    p = plan(None, counts=counts, r=8, seq=256, batch=2, gpu=gpu)
    for m in METHODS:
        b, s = p.max_batch[m], p.max_seq[m]
        if b:
            assert plan(None, counts=counts, r=8, seq=256, batch=b).total_bytes[m] <= gpu
        assert plan(None, counts=counts, r=8, seq=256, batch=b + 1).total_bytes[m] > gpu
        if s:
            assert plan(None, counts=counts, r=8, seq=s, batch=2).total_bytes[m] <= gpu
        if s < 4096:
            assert plan(None, counts=counts, r=8, seq=s + 1, batch=2).total_bytes[m] > gpu
    assert p.max_batch["qlora"] > p.max_batch["full_16bit"]


def test_options_move_the_figures_the_right_way():
    counts = count_model(llama(), r=8)
    base = plan(None, counts=counts, r=8)
    assert plan(None, counts=counts, r=8, gradient_checkpointing=False).activation_bytes["qlora"] > base.activation_bytes["qlora"]
    assert plan(None, counts=counts, r=8, seq=1024).activation_bytes["qlora"] > base.activation_bytes["qlora"]
    assert plan(None, counts=counts, r=8, optimizer="paged_adamw_8bit").optimizer_bytes["qlora"] < base.optimizer_bytes["qlora"]
    assert plan(None, counts=counts, r=8, attention="eager").activation_bytes["qlora"] > base.activation_bytes["qlora"]
    no_dq = count_model(llama(), r=8, double_quant=False)
    assert no_dq.bytes_4bit > counts.bytes_4bit and no_dq.bytes_16bit == counts.bytes_16bit


def test_parse_bytes_units():
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("500 MB") == 500 * 10**6
    assert parse_bytes("1.5gb") == 1_500_000_000
    for bad in ("24", "24XB", "-3GB", "GB", "0GB"):
        with pytest.raises(InvalidArgumentError, match="memory size"):
            parse_bytes(bad)


def test_python_api_is_reexported():
    p = qlora_rs.plan(llama(), r=8, seq=64)
    assert p.lora_params == p.counts.lora_params > 0
    assert set(p.total_bytes) == set(METHODS)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(llama()))
    assert main(["plan", str(tmp_path), "--json", "-r", "8", "--seq", "128", "--batch", "2", "--gpu", "24GB",
                 "--optimizer", "paged_adamw_8bit", "--no-gradient-checkpointing", "--blocksize", "128",
                 "--no-double-quant", "--target-modules", "q_proj,v_proj"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert isinstance(d["params"], int) and isinstance(d["lora_params"], int)
    for key in ("weights_bytes", "optimizer_bytes", "activation_bytes", "total_bytes", "fits", "max_batch", "max_seq"):
        assert set(d[key]) == set(METHODS), key
    assert all(d["fits"].values()) and d["gpu_bytes"] == 24 * 10**9
    assert d["options"]["target_modules"] == ["q_proj", "v_proj"] and d["options"]["blocksize"] == 128
    assert not d["options"]["gradient_checkpointing"] and not d["options"]["double_quant"]
    # LoRA on q_proj and v_proj of 4 layers: r * (in + out) each.
    assert d["lora_params"] == 4 * 8 * ((256 + 256) + (256 + 128))


def test_cli_table(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(llama()))
    assert main(["plan", str(tmp_path), "--gpu", "48GB"]) == 0
    out = capsys.readouterr().out
    for text in ("full 16-bit", "LoRA 16-bit", "QLoRA", "quantization constants", "fits in 48.00 GB",
                 "largest batch at seq 512", "on disk"):
        assert text in out, text


def test_cli_help_states_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "(default: True)" not in out and "(default: False)" not in out
    assert "--no-gradient-checkpointing" in out and "--gpu" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing-dir"], "missing-dir: no such file"),
        (["{cfg}", "--gpu", "24XB"], "memory size '24XB' is not understood"),
        (["{cfg}", "--seq", "0"], "seq must be a positive integer"),
        (["{bert}"], "not a causal language model"),
        (["{bad}"], "not valid JSON"),
    ],
)
def test_cli_errors_name_the_problem(tmp_path, capsys, args, message):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(llama()))
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    argv = ["plan"] + [a.format(cfg=cfg, bert=bert, bad=bad) for a in args]
    if args[0] == "missing-dir":
        argv[1] = str(tmp_path / "missing-dir")
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_api_errors():
    with pytest.raises(InvalidArgumentError, match="optimizer 'sgd'"):
        plan(llama(), optimizer="sgd")
    with pytest.raises(InvalidArgumentError, match="match no linear layer"):
        plan(llama(), target_modules=["nope_proj"])
    with pytest.raises(InvalidArgumentError, match="no 'model_type'"):
        plan({"hidden_size": 8})
