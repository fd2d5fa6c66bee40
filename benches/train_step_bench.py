"""Training-step benchmark on CPU: qlora_rs vs PEFT + bitsandbytes 4-bit vs PEFT 16-bit LoRA.

A Llama-shaped model built from a transformers config (hidden 1024, 4 layers, intermediate 2816,
vocab 8000, 16 heads: ~69M parameters) in bfloat16, LoRA r=16 (alpha 32, dropout 0.05) on every
linear layer but ``lm_head``, AdamW, batch 4 x 256 tokens, causal-LM loss. Every variant runs in
its own subprocess (so peak memory is its own) in the same invocation, and the table reports
tokens/s and peak resident memory during training with the ratios against the two PEFT anchors.

    python benches/train_step_bench.py                 # all three, 1 warm-up + 3 timed steps each
    python benches/train_step_bench.py --steps 5 --dtype float32
    python benches/train_step_bench.py --variant qlora_rs   # one variant, JSON on stdout

Memory: ``model MiB`` is the bytes of the model's tensors (parameters, buffers, quantization
state); ``train MiB`` is how far the resident set (VmHWM, reset just before the first step) rises
above the ready model during training: activations, gradients, optimizer state, temporaries;
``peak MiB`` is their sum. ``RSS MiB`` is the process's whole peak for reference (it also holds the
Python/torch runtime and whatever building the model left in the allocator).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

VARIANTS = ("qlora_rs", "peft_bnb_4bit", "peft_16bit")
LABELS = {
    "qlora_rs": "qlora_rs (NF4 + LoRA)",
    "peft_bnb_4bit": "peft + bitsandbytes NF4",
    "peft_16bit": "peft LoRA, {dtype} base",
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _build_model(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=8000, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy in memory
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def _bnb_quantize(model, compute_dtype):
    """Replaces the linear layers (but lm_head) with bitsandbytes Linear4bit, one at a time."""
    import bitsandbytes as bnb
    import torch

    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)._quantize("cpu")
            if m.bias is not None:
                layer.bias = m.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
    model.is_loaded_in_4bit = True
    return model


def _model_bytes(model) -> int:
    """Bytes of the model's tensors: parameters, buffers and bitsandbytes' per-parameter quant
    states (each storage once)."""
    import torch

    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [v for v in state.as_dict().values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def run_variant(variant: str, dtype_name: str, steps: int, warmup: int, batch: int, seq: int, r: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    import transformers  # noqa: F401  (every import before the baseline: only the model and training count)

    if variant == "qlora_rs":
        import qlora_rs
    else:
        import peft

        if variant == "peft_bnb_4bit":
            import bitsandbytes  # noqa: F401
    _release_memory()
    rss_runtime = _rss_kib("VmRSS")
    model = _build_model(dtype)
    lora = dict(r=r, alpha=2 * r, dropout=0.05)
    if variant == "qlora_rs":
        qlora_rs.quantize_model(model, compute_dtype=dtype)
        qlora_rs.add_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], target_modules="all-linear")
    else:
        if variant == "peft_bnb_4bit":
            _bnb_quantize(model, dtype)
        config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (batch, seq), generator=g)
    _release_memory()
    rss_model = _rss_kib("VmRSS")
    peak_reset = _reset_peak()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak = _rss_kib("VmHWM")
    best = min(times)
    model_mib = _model_bytes(model) / 2**20
    return {
        "variant": variant,
        "dtype": dtype_name,
        "tokens_per_s": batch * seq / best,
        "step_s_min": best,
        "step_s_mean": sum(times) / len(times),
        # The model's own tensors plus what training adds on top of the ready model (activations,
        # gradients, optimizer state): leftovers of building the model do not count.
        "peak_mib": model_mib + (peak - rss_model) / 1024,
        "training_extra_mib": (peak - rss_model) / 1024,
        "model_mib": model_mib,
        "peak_rss_mib": peak / 1024,
        "runtime_rss_mib": rss_runtime / 1024,
        "peak_is_training_only": peak_reset,
        "trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print JSON")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to compare")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and rayon threads (0: their defaults); 1 is faster on an oversubscribed machine")
    args = ap.parse_args()
    if args.threads:
        os.environ["QLORA_RS_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args.variant:
        res = run_variant(args.variant, args.dtype, args.steps, args.warmup, args.batch, args.seq, args.r)
        print(json.dumps(res))
        return

    results = {}
    for v in args.only:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--dtype", args.dtype, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
               "--r", str(args.r), "--threads", str(args.threads)]
        print(f"running {v} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{v} failed (exit {proc.returncode})")
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])

    first = next(iter(results.values()))
    print(f"\ntraining step, Llama 69M ({args.dtype}), batch {args.batch}x{args.seq}, LoRA r={args.r} all-linear, "
          f"AdamW, {first['threads']} threads, best of {args.steps} steps")
    print(f"{'variant':<28}{'tokens/s':>10}{'step s':>9}{'peak MiB':>10}{'model MiB':>11}{'train MiB':>11}"
          f"{'RSS MiB':>9}{'loss[0]':>9}")
    for v, res in results.items():
        print(f"{LABELS[v].format(dtype=args.dtype):<28}{res['tokens_per_s']:>10.1f}{res['step_s_min']:>9.2f}{res['peak_mib']:>10.0f}"
              f"{res['model_mib']:>11.1f}{res['training_extra_mib']:>11.0f}{res['peak_rss_mib']:>9.0f}"
              f"{res['losses'][0]:>9.4f}")
    if "qlora_rs" in results:
        q = results["qlora_rs"]
        for anchor in ("peft_bnb_4bit", "peft_16bit"):
            if anchor in results:
                a = results[anchor]
                print(f"qlora_rs vs {LABELS[anchor].format(dtype=args.dtype)}: speed x{q['tokens_per_s'] / a['tokens_per_s']:.2f}, "
                      f"peak memory x{q['peak_mib'] / a['peak_mib']:.2f}, "
                      f"model memory x{q['model_mib'] / max(a['model_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
