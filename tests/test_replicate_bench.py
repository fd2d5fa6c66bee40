"""The parts of benches/replicate_paper.py (`make replicate`) that decide what its table says: the
train / held-out split by topic, the summary over seeds and the paper's orderings. The runs
themselves are the benchmark (minutes on the real model), not part of the suite."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("replicate_paper", ROOT / "benches" / "replicate_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_pairs_come_from_topics_never_trained_on(rp, tmp_path):
    train, held, info = rp.make_data(tmp_path)
    load = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    train_prompts = {r["prompt"] for r in load(train)}
    held_prompts = {r["prompt"] for r in load(held)}
    assert info["heldout_pairs"] == len(load(held)) > 0 and info["train_pairs"] == len(load(train)) > 100
    # A section's title is in its prompt: no held-out section shares a title with a trained one.
    assert not train_prompts & held_prompts
    assert all(len(r["response"].split()) >= 12 for r in load(held))
    assert (tmp_path / "ppl.txt").read_text(encoding="utf-8") == rp.PPL_SOURCE.read_text(encoding="utf-8")[: rp.PPL_CHARS]
    # Fixed: the same split every time.
    again = rp.make_data(tmp_path / "again")
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == held.read_bytes()


def _run(arm, seed, after, before=None):
    r = {"arm": arm, "seed": seed, "loss_after": after, "tokens_per_s": 100.0, "model_bytes": 2**20,
         "peak_rss_bytes": 2**30, "peak_train_bytes": 2**29, "trainable": 10,
         "phase_seconds": {"load": 1.0, "train": 10.0, "eval_after": 2.0}}
    if before is not None:
        r.update(loss_before=before, base_ppl={"lora16": 20.0, "nf4_dq": 21.0, "nf4": 21.0, "fp4": 25.0,
                                               "int4": 23.0, "nf4_dq_attn": 21.0}[arm])
        r["phase_seconds"]["base"] = 5.0
    return r


def test_summary_and_orderings(rp):
    after = {"lora16": [2.00, 2.02, 2.04], "nf4_dq": [2.05, 2.07, 2.09], "nf4": [2.06, 2.07, 2.08],
             "fp4": [2.20, 2.21, 2.22], "int4": [2.01, 2.02, 2.03], "nf4_dq_attn": [2.30, 2.31, 2.32]}
    runs = [_run(a, s, after[a][s], before=3.0 if s == 0 else None) for s in range(3) for a in after]
    res = {"arms": list(after), "seeds": [0, 1, 2], "steps": 10, "batch": 8, "minutes": 1.0, "runs": runs,
           "data": {"train_pairs": 1, "train_topics": 1, "heldout_pairs": 1, "heldout_topics": 1}}
    rows = rp.summarize(res)
    assert rows["nf4_dq"]["after_mean"] == pytest.approx(2.07)
    assert rows["nf4_dq"]["after_sd"] == pytest.approx(0.02)
    assert rows["nf4_dq"]["gap_pct"] == pytest.approx(100 * (2.07 / 2.02 - 1))
    verdict = {claim: holds for claim, holds, _ in rp.orderings(rows)}
    assert verdict["QLoRA NF4 + DQ within 2% of 16-bit LoRA"] is False  # +2.48%
    assert verdict["NF4 beats FP4"] is True
    assert verdict["NF4 beats INT4"] is False
    assert verdict["LoRA on all linear layers beats attention-only"] is True
    assert verdict["double quantization costs nothing measurable"] is True  # 0.00 apart, spread 0.02
    assert verdict["NF4 base closer to bf16 than FP4 (perplexity)"] is True
    md = rp.table(res, rows)
    assert "| QLoRA NF4 + DQ | 3.0000 | 2.0700 ± 0.0200 (n=3) | +2.48% |" in md
    assert "training 10 s (1.0 s a step)" in md
