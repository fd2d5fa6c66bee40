"""``qlora-rs chat`` and ``qlora-rs eval`` (python/qlora_rs/training/inference.py, evaluation.py): the real
SmolLM2-135M-Instruct answers deterministically; eval equals a hand computation; adapters and runs
apply; bad input is a one-line error."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import qlora_rs
from _loading_helpers import CHAT_TEMPLATE, make_tiny_llama
from qlora_rs import cli
from qlora_rs.training.evaluation import evaluate_path
from qlora_rs.training.inference import load_model

WORDS = "the cat sat on a mat and dog ran to park".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("chat") / "tiny", words=WORDS, seed=4, chat_template=CHAT_TEMPLATE)


def hand_loss(model, tokenizer, text, seq_len):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            if w.shape[1] < 2:
                continue
            logits = model(w).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return total / count, count


def test_eval_of_text_equals_a_hand_computation(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 7))  # 77 tokens: windows of 10, the last one 7 long
    loaded = load_model(tiny, quantize="nf4", compute_dtype=torch.float32)
    result = evaluate_path(loaded.model, loaded.tokenizer, text, seq_len=10, batch_size=3)
    want, count = hand_loss(loaded.model, loaded.tokenizer, text.read_text(), 10)
    assert result.kind == "text" and result.tokens == count == 77 - 8 and result.sequences == 8
    assert result.loss == pytest.approx(want, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(want), rel=1e-5)


def test_eval_of_jsonl_scores_only_the_responses(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "the cat sat on", "response": "a mat"}) + "\n"
                    + json.dumps({"text": "dog ran to park"}) + "\n")
    loaded = load_model(tiny, quantize="none", compute_dtype=torch.float32)
    result = evaluate_path(loaded.model, loaded.tokenizer, data)
    from qlora_rs.io.data import load_dataset

    examples = load_dataset(data, loaded.tokenizer).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = loaded.model(torch.tensor([e.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(e.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert result.kind == "jsonl" and result.tokens == count and result.loss == pytest.approx(total / count, rel=1e-5)


def test_eval_cli_prints_loss_and_perplexity(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 3))
    assert cli.main(["eval", str(tiny), str(text), "--json", "--compute-dtype", "float32", "--seq-len", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "text" and out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert "16-bit" in out["model"]


@pytest.mark.parametrize("argv,message", [
    (["eval", "{tiny}", "{missing}"], "no such file"),
    (["eval", "{tiny}", "{empty}"], "evaluation needs at least 2"),
    (["eval", "{missing}", "{empty}"], "no such model directory"),
    (["chat", "{tiny}", "--adapter", "{tiny}", "--prompt", "hi"], "no adapter_config.json"),
    (["chat", "{tiny}", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("")
    paths = {"tiny": str(tiny), "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty.txt")}
    assert cli.main([a.format(**paths) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"qlora-rs {argv[0]}: error:") and message in err


def test_chat_applies_an_adapter_from_a_run(tiny, tmp_path, capsys):
    model = qlora_rs.from_pretrained(tiny, compute_dtype=torch.float32, dtype=torch.float32)
    qlora_rs.add_lora(model, r=4, alpha=8, init="gaussian")
    torch.manual_seed(0)
    for layer in qlora_rs.surgery.model.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # an adapter that changes the answer
    run = tmp_path / "run"
    qlora_rs.save_adapter(model, run)
    (run / "train_config.json").write_text(json.dumps({"quant_type": "nf4", "blocksize": 64, "double_quant": True}))
    argv = ["chat", str(tiny), "--prompt", "the cat", "--max-new-tokens", "6", "--compute-dtype", "float32"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr()
    assert cli.main(argv + ["--adapter", str(run)]) == 0
    adapted = capsys.readouterr()
    assert "quantized on load to nf4, adapter" in adapted.err and "(16-bit)" in plain.err
    assert adapted.out != plain.out


def test_a_4bit_models_adapters_load_in_float32(tiny, tmp_path):
    """As training keeps them and PEFT loads them; a 16-bit model's take its compute dtype."""
    model = qlora_rs.from_pretrained(tiny)
    qlora_rs.add_lora(model, r=4, alpha=8)
    qlora_rs.save_adapter(model, tmp_path / "adapter")
    for quantize, dtype in (("nf4", torch.float32), ("none", torch.bfloat16)):
        loaded = load_model(tiny, adapter=tmp_path / "adapter", quantize=quantize, compute_dtype=torch.bfloat16)
        layers = qlora_rs.surgery.model.lora_layers(loaded.model).values()
        assert layers and all(layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == dtype for layer in layers)


def test_interactive_chat_keeps_the_conversation(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\nthe dog\n\nnot read\n"))
    assert cli.main(["chat", str(tiny), "--max-new-tokens", "3", "--compute-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2  # two answers, then the empty line ends the session


def test_real_model_answers_deterministically(smollm2_dir, capsys):
    argv = ["chat", str(smollm2_dir), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "Paris" in first
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first
