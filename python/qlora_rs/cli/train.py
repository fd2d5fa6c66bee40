"""``qlora-rs train MODEL_DIR DATA.jsonl -o OUT_DIR``: fine-tune LoRA adapters on a 4-bit model
(see :mod:`qlora_rs.train`; defaults are the QLoRA paper's)."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from ..training.train import OPTIMIZERS, SCHEDULES, TASKS, TrainConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    # Each help says what the default does, once (no ArgumentDefaultsHelpFormatter: it would print
    # "(default: True)" under --no-* switches and "(default: None)" under required options).
    d = TrainConfig(model="", data="", output_dir="")
    p = subparsers.add_parser(
        "train",
        help="fine-tune LoRA adapters on a 4-bit model (QLoRA) from a JSONL file",
        description=(
            "Load MODEL_DIR with its linear layers in 4 bits (a float checkpoint is quantized while it loads; one "
            "converted by 'qlora-rs convert' or saved by transformers + bitsandbytes is taken as it is), add LoRA "
            "adapters to every linear layer and train them on DATA.jsonl: lines of {\"prompt\", \"response\"} (loss on "
            "the response), {\"text\"}, or {\"messages\": [...]} (rendered with the tokenizer's chat template; loss on "
            "the assistant turns). Writes the adapter (PEFT layout), checkpoints, metrics.jsonl and loss.png to OUT_DIR. "
            "Defaults follow the QLoRA paper."
        ),
    )
    p.add_argument("model", metavar="MODEL_DIR", help="local transformers model directory (config.json, safetensors, "
                   "tokenizer); nothing is downloaded")
    p.add_argument("data", metavar="DATA.jsonl", help="training data, one JSON object per line")
    p.add_argument("-o", "--output", dest="output_dir", required=True, metavar="OUT_DIR",
                   help="where to write the run: a new or empty directory, or one of an earlier run (with --resume)")
    p.add_argument("--force", action="store_true",
                   help="write the run into an OUT_DIR that holds other files (they are left alone); without it such "
                        "an OUT_DIR is refused")
    g = p.add_argument_group("data")
    g.add_argument("--eval-file", help="JSONL evaluated every --eval-every steps (eval loss in metrics.jsonl); "
                   "without it there is no evaluation")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help=f"tokens per example, longer ones are cut (default: {d.max_seq_len})")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="batch examples in plain random order; without it examples of similar length share a "
                        "batch (less padding, same examples per epoch)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (and count them); without it the first one stops the run")
    g.add_argument("--task", choices=TASKS, default=d.task,
                   help=f"causal-lm: next-token loss; contrastive: prompt/response embedding matching (encoders, e.g. "
                        f"BERT) (default: {d.task})")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--lora-r", dest="r", type=int, default=d.r, help=f"LoRA rank (default: {d.r})")
    g.add_argument("--lora-alpha", dest="alpha", type=float, default=d.alpha,
                   help=f"LoRA alpha, scaling alpha / r (default: {d.alpha:g})")
    g.add_argument("--lora-dropout", dest="dropout", type=float, default=d.dropout,
                   help=f"dropout on the LoRA input (default: {d.dropout:g})")
    g.add_argument("--target-modules", default=d.target_modules,
                   help="'all-linear' (the default: every linear layer but the output head), a comma-separated list "
                        "of names (q_proj,v_proj), or a regex on full names")
    g.add_argument("--use-rslora", action="store_true",
                   help="scale by alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r")
    g = p.add_argument_group("quantization (float checkpoints)")
    g.add_argument("--quant-type", choices=("nf4", "fp4"), default=d.quant_type,
                   help=f"4-bit data type (default: {d.quant_type})")
    g.add_argument("--blocksize", type=int, default=d.blocksize,
                   help=f"elements per absmax block (default: {d.blocksize})")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the block scales in float32; without it they are quantized to 8 bits (double "
                        "quantization)")
    g.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float16", "float32"), default=d.compute_dtype,
                   help="dtype of the 4-bit layers' matmuls (default: auto: bfloat16 on CUDA and on CPUs with bf16 "
                        "matrix instructions (AMX, AVX512-BF16), float32 on other CPUs)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help=f"learning-rate schedule after the warmup (default: {d.schedule})")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"fraction of the steps spent warming up (default: {d.warmup_ratio:g})")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping norm (default: {d.max_grad_norm:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay (default: {d.weight_decay:g})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="the optimizer (default: auto, paged AdamW on CUDA and torch AdamW on CPU)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per micro-batch (default: {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"micro-batches per optimizer step (default: {d.grad_accum})")
    g.add_argument("--max-steps", type=int, help="optimizer steps, overriding --epochs (default: as many as --epochs "
                   "takes)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default: {d.epochs})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the LoRA init, the data order and dropout (default: {d.seed})")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations (faster, more memory); without it they are recomputed in the backward pass")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"steps between checkpoints (default: {d.save_every}; the last step always saves)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: the --save-every value)")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit,
                   help=f"checkpoints kept, the newest (default: {d.save_total_limit})")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUT_DIR from its newest checkpoint; without it an OUT_DIR with "
                        "checkpoints is refused")
    g.add_argument("--device", default=d.device,
                   help="auto, cpu or cuda (default: auto, CUDA when torch sees a GPU)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    g.add_argument("--distributed", choices=("auto", "ddp", "fsdp"), default=d.distributed,
                   help="under torchrun / accelerate launch: ddp keeps the 4-bit model on every GPU, fsdp shards it "
                        "(FSDP2) so each GPU holds 1/N; --batch-size is per process (default: auto, which is ddp)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress output; without it a bar on a terminal, else a line every ~5%% of the run")
    g.add_argument("--no-plot", dest="plot", action="store_false",
                   help="skip loss.png; without it the loss curve is drawn at the end")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    target = args.target_modules
    if target != "all-linear" and not any(c in target for c in ".*+?[](){}|^$\\"):
        target = [t.strip() for t in target.split(",") if t.strip()]  # names, not a regex
    return TrainConfig(
        model=args.model, data=args.data, output_dir=args.output_dir, eval_file=args.eval_file, task=args.task,
        r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=target, use_rslora=args.use_rslora,
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
        compute_dtype=args.compute_dtype, lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, optimizer=args.optimizer,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len,
        group_by_length=args.group_by_length, max_steps=args.max_steps,
        epochs=args.epochs, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every, eval_every=args.eval_every, save_total_limit=args.save_total_limit,
        skip_bad_lines=args.skip_bad_lines, resume=args.resume, device=args.device, threads=args.threads,
        distributed=args.distributed, progress=args.progress, plot=args.plot, force=args.force,
    )


def run(args: argparse.Namespace) -> int:
    from ..training.train import train

    train(config_from_args(args))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``qlora-rs train ...`` (the same as ``qlora_rs.cli.main(["train", ...])``)."""
    from .app import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
