"""``qlora-rs train MODEL_DIR DATA.jsonl -o OUT_DIR``: fine-tune LoRA adapters on a 4-bit model
(see :mod:`qlora_rs.train`; defaults are the QLoRA paper's)."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from .train import OPTIMIZERS, SCHEDULES, TASKS, TrainConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="transformers model directory (config.json, safetensors, tokenizer)")
    p.add_argument("data", metavar="DATA.jsonl", help="training data, one JSON object per line")
    p.add_argument("-o", "--output", dest="output_dir", required=True, metavar="OUT_DIR", help="where to write the run")
    g = p.add_argument_group("data")
    g.add_argument("--eval-file", help="JSONL evaluated every --eval-every steps (eval loss in metrics.jsonl)")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="tokens per example (longer ones are cut)")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (and count them) instead of failing")
    g.add_argument("--task", choices=TASKS, default=d.task,
                   help="causal-lm: next-token loss; contrastive: prompt/response embedding matching (encoders, e.g. BERT)")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--lora-r", dest="r", type=int, default=d.r, help="LoRA rank")
    g.add_argument("--lora-alpha", dest="alpha", type=float, default=d.alpha, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora-dropout", dest="dropout", type=float, default=d.dropout, help="dropout on the LoRA input")
    g.add_argument("--target-modules", default=d.target_modules,
                   help="'all-linear', a comma-separated list of names (q_proj,v_proj), or a regex on full names")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    g = p.add_argument_group("quantization (float checkpoints)")
    g.add_argument("--quant-type", choices=("nf4", "fp4"), default=d.quant_type, help="4-bit data type")
    g.add_argument("--blocksize", type=int, default=d.blocksize, help="elements per absmax block")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="keep the block scales in float32")
    g.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float16", "float32"), default=d.compute_dtype,
                   help="dtype of the 4-bit layers' matmuls (auto: bfloat16 on CUDA, float32 on CPU)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule after the warmup")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of the steps spent warming up")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="auto: paged AdamW on CUDA, torch AdamW on CPU")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the LoRA init, the data order and dropout")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (faster, more memory)")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: --save-every)")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its newest checkpoint")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--distributed", choices=("auto", "ddp", "fsdp"), default=d.distributed,
                   help="under torchrun / accelerate launch: ddp (auto) keeps the 4-bit model on every GPU; fsdp shards "
                        "it (FSDP2) so each GPU holds 1/N; --batch-size is per process")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw loss.png")
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
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len, max_steps=args.max_steps,
        epochs=args.epochs, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every, eval_every=args.eval_every, save_total_limit=args.save_total_limit,
        skip_bad_lines=args.skip_bad_lines, resume=args.resume, device=args.device, threads=args.threads,
        distributed=args.distributed, progress=args.progress,
        plot=args.plot,
    )


def run(args: argparse.Namespace) -> int:
    from .train import train

    train(config_from_args(args))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``qlora-rs train ...`` (the same as ``qlora_rs.cli.main(["train", ...])``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
