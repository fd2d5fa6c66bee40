"""The training loop and ``qlora-rs train``: outputs, the paper's defaults, checkpoints, and a
resume after a SIGKILL that reaches exactly the losses of an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _loading_helpers import make_tiny_llama, save_tokenizer
from qlora_rs.errors import InvalidArgumentError
from qlora_rs.training.train import TrainConfig, latest_checkpoint, train

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@pytest.fixture(autouse=True)
def one_thread():
    # One torch thread: fast on a busy machine, and the same arithmetic as the subprocesses below.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    records = []
    for _ in range(48):
        a, b = rng.randrange(7), rng.randrange(6)
        records.append({"prompt": f"add {NUMBERS[a]} and {NUMBERS[b]} =", "response": NUMBERS[a + b]})
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    model = make_tiny_llama(d / "model", words=["add", "and", "="] + NUMBERS, seed=1)
    return d, model, data


def config(setup, out: Path, **kw) -> TrainConfig:
    d, model, data = setup
    base = dict(model=str(model), data=str(data), output_dir=str(out), r=8, alpha=16, lr=5e-3, batch_size=4,
                grad_accum=2, max_steps=8, save_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_adapter_checkpoints_metrics_and_plot(setup, tmp_path):
    d = setup[0]
    log = io.StringIO()
    result = train(config(setup, tmp_path / "run", max_steps=12, save_every=4, lr=1e-2, eval_file=str(d / "eval.jsonl")),
                   out=log)
    out = tmp_path / "run"
    assert result.steps == 12 and result.trainable_params == 16384
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                                               "loss.png", "train_config.json", "checkpoint-8", "checkpoint-12"}
    assert not (out / "checkpoint-4").exists()  # save_total_limit=2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baseline, *records = metrics(out)
    assert baseline.keys() == {"step", "eval_loss"} and baseline["step"] == 0  # before the first step
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]
    assert records[-1]["eval_loss"] < baseline["eval_loss"]
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(1e-2)  # 1 warmup step (3% of 12, rounded up)
    assert all(r["grad_norm"] >= 0 and r["tokens"] > 0 for r in records)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["task_type"] == "CAUSAL_LM"
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    text = log.getvalue()
    assert "memory" in text and "trainable  16,384 LoRA params" in text and "loss" in text


_KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys, torch
    from qlora_rs.training.train import TrainConfig, train
    torch.set_num_threads(1)
    def kill(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    train(TrainConfig(**json.loads(sys.argv[1])), callbacks=[kill])
""")


@pytest.mark.slow
def test_resume_after_a_kill_reaches_the_same_losses(setup, tmp_path):
    plain = train(config(setup, tmp_path / "plain", dropout=0.1), out=io.StringIO())
    cfg = config(setup, tmp_path / "killed", dropout=0.1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(asdict(cfg))], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    assert latest_checkpoint(killed).name == "checkpoint-4"
    assert not (killed / "adapter_model.safetensors").exists()  # the final adapter comes only at the end
    # A kill during a checkpoint write leaves a hidden temporary; it must not be taken for a checkpoint.
    (killed / ".checkpoint-6.tmp-999").mkdir()
    (killed / "checkpoint-6").mkdir()  # an incomplete directory without trainer state is ignored too
    cfg.resume = True
    resumed = train(cfg, out=io.StringIO())
    assert resumed.resumed_from == 4 and resumed.steps == 8
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(tmp_path / "plain")]
    assert [r["step"] for r in metrics(killed)] == list(range(1, 9))
    assert resumed.final_loss == plain.final_loss
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / ".checkpoint-6.tmp-999").exists()


def test_resume_refuses_what_it_cannot_continue(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> directory to resume from"):
        train(config(setup, tmp_path / "empty", resume=True), out=io.StringIO())
    train(config(setup, tmp_path / "run", max_steps=2), out=io.StringIO())
    with pytest.raises(InvalidArgumentError, match="already holds checkpoints of a run .* pass --resume"):
        train(config(setup, tmp_path / "run", max_steps=2), out=io.StringIO())
    with pytest.raises(InvalidArgumentError, match=r"other options: r \(8 then, 4 now\)"):
        train(config(setup, tmp_path / "run", max_steps=4, r=4, resume=True), out=io.StringIO())


def test_cli_defaults_are_the_paper_recipe():
    from qlora_rs.cli import build_parser
    from qlora_rs.cli.train import config_from_args

    c = config_from_args(build_parser().parse_args(["train", "m", "d.jsonl", "-o", "out"]))
    assert (c.r, c.alpha, c.dropout, c.target_modules) == (64, 16, 0.05, "all-linear")
    assert (c.lr, c.schedule, c.warmup_ratio, c.max_grad_norm, c.weight_decay) == (2e-4, "constant", 0.03, 0.3, 0.0)
    assert (c.quant_type, c.double_quant, c.blocksize, c.gradient_checkpointing, c.optimizer) == ("nf4", True, 64, True, "auto")
    c = config_from_args(build_parser().parse_args(
        ["train", "m", "d.jsonl", "-o", "out", "--target-modules", "q_proj,v_proj", "--grad-accum", "8",
         "--max-steps", "10", "--eval-file", "e.jsonl", "--resume", "--skip-bad-lines", "--no-gradient-checkpointing"]))
    assert c.target_modules == ["q_proj", "v_proj"] and (c.grad_accum, c.max_steps, c.eval_file) == (8, 10, "e.jsonl")
    assert c.resume and c.skip_bad_lines and not c.gradient_checkpointing
    for flag, want in (("q_proj", ["q_proj"]), (r".*\.(q|v)_proj", r".*\.(q|v)_proj")):
        c = config_from_args(build_parser().parse_args(["train", "m", "d", "-o", "o", "--target-modules", flag]))
        assert c.target_modules == want


def test_cli_train_and_its_errors(setup, tmp_path, capsys):
    from qlora_rs.cli import main

    d, model, data = setup
    out = tmp_path / "cli"
    args = ["train", str(model), str(data), "-o", str(out), "--max-steps", "2", "-r", "4", "--batch-size", "2",
            "--grad-accum", "1", "--no-plot", "--no-progress"]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "loss.png").exists()
    assert "schedule   2 steps" in capsys.readouterr().out
    assert main(args) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "add one and two =", "response": "three"}\n{"prompt": "one"}\n')
    assert main(["train", str(model), str(bad), "-o", str(tmp_path / "b"), "--max-steps", "1", "--no-progress"]) == 1
    assert "bad.jsonl:2: has 'prompt' but no 'response'" in capsys.readouterr().err
    assert main(["train", str(model), str(bad), "-o", str(tmp_path / "c"), "--max-steps", "1", "--no-progress",
                 "--skip-bad-lines", "-r", "4", "--no-plot"]) == 0
    assert "skipped 1 bad lines (line 2" in capsys.readouterr().out


def test_contrastive_task_trains_an_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    words = ["capital", "of", "france", "paris", "japan", "tokyo", "italy", "rome", "spain", "madrid"]
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32, architectures=["BertModel"]))
    bert.save_pretrained(str(tmp_path / "bert"))
    save_tokenizer(tmp_path / "bert", words, 64)
    pairs = [("capital of france", "paris"), ("capital of japan", "tokyo"), ("capital of italy", "rome"),
             ("capital of spain", "madrid")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cfg = TrainConfig(model=str(tmp_path / "bert"), data=str(data), output_dir=str(tmp_path / "run"), task="contrastive",
                      r=4, lr=1e-2, batch_size=4, grad_accum=1, max_steps=6, save_every=6, progress=False, plot=False)
    result = train(cfg, out=io.StringIO())
    assert result.steps == 6 and result.final_loss < result.first_loss
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["task_type"] is None
    with pytest.raises(InvalidArgumentError, match="is a BertModel, not a causal language model: use task 'contrastive'"):
        train(TrainConfig(model=str(tmp_path / "bert"), data=str(data), output_dir=str(tmp_path / "x"), progress=False),
              out=io.StringIO())


@pytest.mark.gpu
def test_train_on_cuda_with_paged_adamw(setup, tmp_path):
    log = io.StringIO()
    result = train(config(setup, tmp_path / "gpu", device="cuda", compute_dtype="bfloat16", max_steps=6), out=log)
    assert result.steps == 6 and result.final_loss < result.first_loss
    assert "PagedAdamW" in log.getvalue() and "on cuda" in log.getvalue()
    state = torch.load(tmp_path / "gpu" / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"], "the optimizer state is checkpointed"



def test_group_by_length_sees_every_example_once_per_epoch_with_less_padding():
    import random

    from qlora_rs.training.train import _Stream

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1003)]

    def epoch(stream):
        return [stream.next() for _ in range(stream.per_epoch)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped, plain = _Stream(1003, 8, 5, lengths), _Stream(1003, 8, 5)
    for _ in range(2):
        g, p = epoch(grouped), epoch(plain)
        assert sorted(i for b in g for i in b) == list(range(1003))
        assert all(len(b) == 8 for b in g[:-1]) and len(g[-1]) == 1003 % 8
        assert padding(g) < 0.2 * padding(p)
    # The order depends only on the seed and the epoch (what --resume relies on).
    again = _Stream(1003, 8, 5, lengths)
    again.epoch = 1
    assert epoch(again) == g
    # Batches are not simply sorted longest first.
    firsts = [max(lengths[i] for i in b) for b in g[:-1]]
    assert firsts != sorted(firsts, reverse=True)
