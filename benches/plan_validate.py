"""`qlora-rs plan` against measurement: for each configuration, the plan's figures (predicted)
beside the memory a real training step of qlora_rs allocates (measured), per component, and
their ratio.

Measured on the CPU by default: peak bytes from the CPU allocator's own reports to torch's
profiler (see ``qlora_rs.training.memory_plan``); with ``--device cuda``, ``torch.cuda.max_memory_allocated``.
Components: weights, LoRA parameters, optimizer state (counted exactly), gradients (at the end
of the backward), activations (the peak of the forward and backward above the step's start) and
the total (weights + LoRA + optimizer state + the step's peak). Models have random weights;
memory does not depend on the values.

    python benches/plan_validate.py                  # every configuration (SmolLM2 at 30 layers: ~1 min)
    python benches/plan_validate.py --quick          # the small ones
    python benches/plan_validate.py --device cuda    # on a GPU (needs the CUDA kernels built in)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "tests" / "data" / "smollm2-135m-instruct.config.json"
COMPONENTS = ("weights", "lora", "optimizer", "gradients", "activations", "total")


def _llama(**kw) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4000,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


def configurations(quick: bool) -> list[tuple[str, dict, str, dict]]:
    """(label, config, method, options)."""
    smol = json.loads(SMOLLM2.read_text())
    tiny, wide = _llama(), _llama(intermediate_size=2048, vocab_size=256)
    runs = [
        ("tiny llama b2 s128", tiny, "qlora", dict(batch=2, seq=128, gradient_checkpointing=False, padding=False)),
        ("tiny llama b2 s128 ckpt pad", tiny, "qlora", dict(batch=2, seq=128, gradient_checkpointing=True, padding=True)),
        ("wide mlp b2 s96 ckpt pad", wide, "qlora", dict(batch=2, seq=96, gradient_checkpointing=True, padding=True)),
        ("tiny llama eager pad 8-bit", tiny, "qlora", dict(batch=2, seq=128, gradient_checkpointing=False, padding=True,
                                                           attention="eager", optimizer="paged_adamw_8bit")),
        ("tiny llama 16-bit LoRA", tiny, "lora_16bit", dict(batch=2, seq=128, gradient_checkpointing=False,
                                                            padding=False)),
        ("tiny llama full 16-bit ckpt", tiny, "full_16bit", dict(batch=2, seq=128, gradient_checkpointing=True,
                                                                 padding=True)),
        ("smollm2 (3 layers) b1 s64 pad", {**smol, "num_hidden_layers": 3}, "qlora",
         dict(batch=1, seq=64, gradient_checkpointing=False, padding=True)),
    ]
    if not quick:
        runs += [
            ("smollm2-135m b1 s64 pad", smol, "qlora", dict(batch=1, seq=64, gradient_checkpointing=False, padding=True)),
            ("smollm2-135m b2 s128 ckpt", smol, "qlora", dict(batch=2, seq=128, gradient_checkpointing=True,
                                                              padding=False)),
        ]
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="leave out the full 30-layer SmolLM2 runs")
    ap.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default: 1; memory does not depend on it, the time on a busy machine does)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)

    import torch

    from qlora_rs.training.memory_measure import measure_training_step
    from qlora_rs.training.memory_plan import plan
    from qlora_rs.core.ops import matmul_dtype

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mm = matmul_dtype(torch.bfloat16, device) if device.type == "cpu" else None
    records, worst = [], {"activations": 1.0, "total": 1.0}
    for label, cfg, method, options in configurations(args.quick):
        opts = dict(options)
        optimizer = opts.pop("optimizer", "paged_adamw")
        attention = opts.pop("attention", "sdpa")
        t0 = time.perf_counter()
        predicted = plan(cfg, r=args.r, optimizer=optimizer, attention=attention, matmul_dtype=mm, **opts)
        measured = measure_training_step(cfg, method, r=args.r, optimizer=optimizer, attention=attention,
                                         device=args.device, **opts)
        seconds = time.perf_counter() - t0
        figures = {
            "weights": predicted.weights_bytes[method], "lora": predicted.lora_bytes[method],
            "optimizer": predicted.optimizer_bytes[method], "gradients": predicted.gradient_bytes[method],
            "activations": predicted.activation_bytes[method], "total": predicted.total_bytes[method],
        }
        print(f"\n{label}: {method}, batch {opts['batch']} x seq {opts['seq']}, {attention}, {optimizer}, "
              f"r={args.r} ({seconds:.0f} s)")
        print(f"  {'component':<12} {'predicted':>14} {'measured':>14} {'ratio':>7}")
        for k in COMPONENTS:
            ratio = figures[k] / measured[k] if measured[k] else (1.0 if figures[k] == 0 else float("inf"))
            print(f"  {k:<12} {figures[k]:>14,} {measured[k]:>14,} {ratio:>7.3f}")
            if k in worst and abs(ratio - 1) > abs(worst[k] - 1):
                worst[k] = ratio
        records.append({"label": label, "method": method, "options": {**opts, "optimizer": optimizer,
                        "attention": attention, "r": args.r}, "predicted": figures, "measured": measured})
    print(f"\nworst predicted/measured ratio over {len(records)} runs: activations {worst['activations']:.3f}, "
          f"total {worst['total']:.3f} (device {args.device})")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
