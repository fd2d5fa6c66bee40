"""`qlora-rs train` against a training loop written with the Python API, on the real
SmolLM2-135M-Instruct in NF4 + double quantization: tokens/s for the same batches.

Both sides load the same 4-bit checkpoint, add LoRA (r=16 on every linear layer), and train with
AdamW on the built-in qlora-rs facts (chat format) for the same number of steps, batch size, sequence
length and gradient checkpointing setting. The API loop is the few lines a user writes: shuffled
batches of the dataset, `collate`, forward, loss on the labels, backward, step. Each side runs in its
own subprocess, alternating, `--repeats` times; the first `--warmup` steps of each run are not timed.

    python benches/train_cli_bench.py [--steps 12] [--batch-size 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prepare(work: Path) -> tuple[Path, Path]:
    """The converted model and the training file (made once per invocation)."""
    from qlora_rs.training.datasets import facts
    from qlora_rs.models import smollm2

    model = work / "smollm2-nf4"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "qlora_rs.cli", "convert", str(smollm2()), "-o", str(model)], check=True,
                       stdout=subprocess.DEVNULL)
    data = work / "train.jsonl"
    train, _ = facts.split(facts.records())
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in train))
    return model, data


def _cli(model: str, data: str, out: str, steps: int, batch: int, warmup: int, gc: bool) -> dict:
    import io

    from qlora_rs.training.train import TrainConfig, train

    config = TrainConfig(model=model, data=data, output_dir=out, r=16, alpha=32, dropout=0.05, lr=2e-4,
                         batch_size=batch, grad_accum=1, max_seq_len=256, max_steps=steps, save_every=steps,
                         progress=False, plot=False, gradient_checkpointing=gc, force=True, seed=0)
    result = train(config, out=io.StringIO())
    timed = result.history[warmup:]
    return {"tokens": sum(h["tokens"] for h in timed), "seconds": sum(h["tokens"] / h["tokens_per_s"] for h in timed)}


def _api(model: str, data: str, out: str, steps: int, batch: int, warmup: int, gc: bool) -> dict:
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    import qlora_rs
    from qlora_rs.io.data import collate, load_dataset

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    examples = load_dataset(data, tok, 256).examples
    m = qlora_rs.from_pretrained(model)
    qlora_rs.add_lora(m, r=16, alpha=32, dropout=0.05)
    qlora_rs.prepare_for_training(m, gradient_checkpointing=gc)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    tokens = seconds = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        b = collate([examples[order[(step * batch + i) % len(order)]] for i in range(batch)], tok.pad_token_id or 0)
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(b["attention_mask"].sum())
            seconds += time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--side", choices=("cli", "api"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gc = not args.no_gradient_checkpointing
    if args.side:
        model, data = Path(args.work) / "smollm2-nf4", Path(args.work) / "train.jsonl"
        fn = _cli if args.side == "cli" else _api
        run_dir = Path(args.work) / f"run-{os.getpid()}"  # a fresh run each time (no resume)
        print(json.dumps(fn(str(model), str(data), str(run_dir), args.steps, args.batch_size, args.warmup, gc)))
        return
    with tempfile.TemporaryDirectory(prefix="qlora-rs-train-bench-") as tmp:
        work = Path(tmp)
        _prepare(work)
        rates: dict[str, list[float]] = {"cli": [], "api": []}
        for _ in range(args.repeats):
            for side in ("api", "cli"):
                cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
                if not gc:
                    cmd.append("--no-gradient-checkpointing")
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE")).stdout.splitlines()[-1])
                rates[side].append(r["tokens"] / r["seconds"])
                print(f"  {side}: {rates[side][-1]:.1f} tokens/s", flush=True)
    api, cli = statistics.median(rates["api"]), statistics.median(rates["cli"])
    print(f"SmolLM2-135M-Instruct NF4, batch {args.batch_size}, {args.steps - args.warmup} timed steps, "
          f"gradient checkpointing {'on' if gc else 'off'}:")
    print(f"  Python API loop  {api:7.1f} tokens/s (median of {args.repeats})")
    # Each CLI run against the API run just before it: on a shared machine the speed drifts between
    # pairs more than between the two runs of one pair.
    pairs = sorted(c / a for a, c in zip(rates["api"], rates["cli"]))
    print(f"  qlora-rs train   {cli:7.1f} tokens/s = {cli / api:.2f}x the API loop; run by run "
          f"{', '.join(f'{r:.2f}x' for r in pairs)} (median {statistics.median(pairs):.2f}x)")


if __name__ == "__main__":
    main()
