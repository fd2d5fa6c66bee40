"""``qlora-rs plan MODEL_DIR|config.json``: the QLoRA paper's memory table for any transformers
causal LM, from its config alone: weights (16-bit, and 4-bit with their quantization
constants), LoRA parameters and gradients, optimizer state, activations (the loss's logits
included), and the totals of full 16-bit fine-tuning, 16-bit LoRA and QLoRA; with ``--gpu``,
whether each fits and the largest batch and sequence that do. Nothing is downloaded or loaded:
the model is built on the meta device (see :mod:`qlora_rs.training.memory_plan`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, TextIO

from ..training.memory_plan import ATTENTIONS, METHODS, OPTIMIZERS

__all__ = ["add_parser", "run"]

_LABELS = {"full_16bit": "full 16-bit", "lora_16bit": "LoRA 16-bit", "qlora": "QLoRA"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    # Each help says what the default does, once (no ArgumentDefaultsHelpFormatter: it would
    # print "(default: True)" under the --no-* switches).
    p = subparsers.add_parser(
        "plan",
        help="the memory budget of fine-tuning a model (full 16-bit, LoRA, QLoRA) from its config.json",
        description=(
            "The QLoRA paper's memory table for a transformers causal LM, from its config alone: weights (16-bit, and "
            "4-bit with their quantization constants), LoRA parameters and gradients, optimizer state, activations "
            "(the loss's logits included), and the totals of full 16-bit fine-tuning, 16-bit LoRA and QLoRA; with "
            "--gpu, whether each fits and the largest batch and sequence that do. Nothing is downloaded or loaded: "
            "the model is built on the meta device."
        ),
    )
    p.add_argument("config", metavar="MODEL_DIR|config.json",
                   help="a model directory holding config.json, or a config.json; nothing else is read")
    g = p.add_argument_group("training step")
    g.add_argument("--seq", type=int, default=512, help="tokens per example (default: 512, as in the paper's figure)")
    g.add_argument("--batch", type=int, default=1, help="examples per step (default: 1)")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=True,
                   help="recompute each layer's activations in the backward, keeping one hidden state per layer "
                        "(the default, as in the paper)")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every layer's activations for the backward")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="paged_adamw",
                   help="paged_adamw: float32 states in unified memory, the paper's paged_adamw_32bit (the default); "
                        "paged_adamw_8bit: blockwise 8-bit states; adamw: torch.optim.AdamW, states in the "
                        "parameters' dtype")
    g.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="16-bit weights and compute (default: bfloat16)")
    g.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                   help="transformers' attention: sdpa keeps no seq x seq matrix (the default); eager keeps the "
                        "softmax")
    g.add_argument("--no-padding", dest="padding", action="store_false",
                   help="batches of equal-length examples; without it batches are padded to their longest example, "
                        "as 'qlora-rs train' does, which adds a mask per layer and full key/value heads")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--r", "--lora-r", dest="r", type=int, default=64, help="LoRA rank (default: 64)")
    g.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' (the default: every linear layer but the output head), a comma-separated list "
                        "of names (q_proj,v_proj), or a regex on full names")
    g.add_argument("--lora-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the adapters (default: float32, as qlora_rs.add_lora makes them)")
    g.add_argument("--lora-dropout", type=float, default=0.05,
                   help="dropout on the LoRA input; above 0 each adapted layer keeps a mask (default: 0.05)")
    g = p.add_argument_group("4-bit format")
    g.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default: nf4)")
    g.add_argument("--blocksize", type=int, default=64, help="elements per absmax block (default: 64)")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="float32 block scales; without it they are double-quantized to 8 bits")
    g = p.add_argument_group("output")
    g.add_argument("--gpu", metavar="SIZE",
                   help="GPU memory, e.g. 24GB, 80GiB, 48000MB: adds whether each method fits and the largest batch "
                        "(at --seq) and sequence (at --batch) that fit; without it no fit is reported")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=run)
    return p


def _targets(text: str) -> Any:
    # The rule of 'qlora-rs train --target-modules': names unless it looks like a regex.
    if text != "all-linear" and not any(c in text for c in ".*+?[](){}|^$\\"):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from ..training.memory_plan import plan

    out = out if out is not None else sys.stdout
    result = plan(
        args.config, r=args.r, seq=args.seq, batch=args.batch, target_modules=_targets(args.target_modules),
        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing, quant_type=args.quant_type,
        blocksize=args.blocksize, double_quant=args.double_quant, dtype=args.dtype, lora_dtype=args.lora_dtype,
        lora_dropout=args.lora_dropout, attention=args.attention, padding=args.padding, gpu=args.gpu,
    )
    if args.json:
        json.dump(result.to_dict(), out, indent=2)
        print(file=out)
        return 0
    print_table(result, out)
    return 0


def print_table(result: Any, out: TextIO) -> None:
    """The readable form of a :class:`~qlora_rs.training.memory_plan.MemoryPlan`."""
    from .output import _bytes, _count, _table

    c, o = result.counts, result.options
    kv = f" ({c.kv_heads} key-value)" if c.kv_heads != c.heads else ""
    print(f"model      {c.model_type} ({c.architecture}): {c.layers} layers, hidden {c.hidden}, intermediate "
          f"{c.intermediate}, {c.heads} heads{kv}, head dim {c.head_dim}, vocab {c.vocab}"
          + (", tied embeddings" if c.tied_embeddings else ""), file=out)
    dq = ", double quant" if o["double_quant"] else ""
    print(f"params     {_count(c.params)} ({_count(c.quantized_params)} in linear layers: 4-bit {o['quant_type']}, "
          f"block {o['blocksize']}{dq})", file=out)
    share = 100.0 * c.lora_params / max(c.params, 1)
    print(f"LoRA       r={o['r']} on {c.lora_layers} layers: {_count(c.lora_params)} params ({share:.2f}%), "
          f"{o['lora_dtype']}, dropout {o['lora_dropout']:g}", file=out)
    gc = "gradient checkpointing" if o["gradient_checkpointing"] else "no gradient checkpointing"
    pad = "padded" if o["padding"] else "unpadded"
    print(f"step       batch {o['batch']} x seq {o['seq']}, {o['dtype']}, {o['attention']} attention, {pad} batches, "
          f"{gc}, {o['optimizer']}", file=out)
    print(file=out)

    def row(label: str, values: dict, dash_zero: bool = False) -> list[str]:
        return [label] + ["-" if dash_zero and not values[m] else _bytes(values[m]) for m in METHODS]

    parts = c.bytes_4bit_parts
    consts = parts["absmax"] + parts["nested_absmax"] + parts["quant_maps"]
    blank = {"full_16bit": 0, "lora_16bit": 0}
    acts = result.activation_parts
    paged = " (paged)" if o["optimizer"] in ("paged_adamw", "paged_adamw_8bit") else ""
    rows = [
        row("weights", result.weights_bytes),
        row("  4-bit packed", {**blank, "qlora": parts["packed"]}, True),
        row("  quantization constants", {**blank, "qlora": consts}, True),
        row("  kept in 16 bits", {**blank, "qlora": parts["kept"]}, True),
        row("LoRA parameters", result.lora_bytes, True),
        row("gradients", result.gradient_bytes, True),
        row(f"optimizer state{paged}", result.optimizer_bytes, True),
        row("activations (peak)", result.activation_bytes),
        row("  kept for the backward", {m: acts[m]["layers"] + acts[m]["other"] for m in METHODS}),
        row("  + larger of: the loss", {m: acts[m]["logits"] for m in METHODS}),
        row("    or one layer", {m: acts[m]["layer_recompute"] + acts[m]["transient"] for m in METHODS}),
        row("total", result.total_bytes),
    ]
    if result.gpu_bytes is not None:
        label = _bytes(result.gpu_bytes)
        fits = []
        for m in METHODS:
            if result.fits[m]:
                fits.append("yes")
            elif result.fits_with_paging is not None and result.fits_with_paging[m]:
                fits.append("with paging")
            else:
                fits.append("no")
        rows.append([f"fits in {label}"] + fits)
        rows.append([f"largest batch at seq {o['seq']}"] + [str(result.max_batch[m]) for m in METHODS])
        rows.append([f"largest seq at batch {o['batch']}"] + [str(result.max_seq[m]) for m in METHODS])
    _table([""] + [_LABELS[m] for m in METHODS], rows, [False, True, True, True], out)
    print(file=out)
    print("activations: what the step keeps for the backward, plus the larger of the loss's float32 logits at the "
          "start of the backward and one layer's backward (recomputed activations with checkpointing, temporaries)",
          file=out)
    print(f"on disk    {_bytes(result.checkpoint_bytes['full_16bit'])} in 16 bits, "
          f"{_bytes(result.checkpoint_bytes['qlora'])} in 4 bits (tensor data; the 4-bit checkpoint adds each "
          "weight's JSON state and leaves out buffers, so it differs from the weights in memory above)", file=out)
    for note in result.notes:
        print(f"note       {note}", file=out)
