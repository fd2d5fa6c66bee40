"""``qlora-rs chat MODEL_DIR [--adapter RUN_DIR] [--prompt TEXT]``: talk to a model through its chat
template, the answer streamed token by token. With ``--prompt`` it answers once and exits; without,
it reads one message per line from the terminal (an empty line or end of input ends the session)
and keeps the conversation. Greedy decoding by default (the same answer every time); ``--temperature``
above 0 samples, with ``--top-p``. MODEL_DIR may be a float, converted or bitsandbytes-saved model;
the adapter (a PEFT directory or a ``qlora-rs train`` run) is applied on top.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat with a model (and adapter), answers streamed token by token",
                              description=__doc__.replace("``", "'"))
    add_model_arguments(p)
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit (without it: interactive)")
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with "
                   "(without it the chat template's own default, if any, applies)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="stop an answer after N tokens if it has not ended by itself (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 decodes greedily, the same answer every time (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="with --temperature > 0, sample from the smallest set of tokens whose probability "
                        "reaches P (default: 1, all tokens)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not fixed)")
    p.set_defaults(func=run)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR, --adapter, --quantize, --compute-dtype and --threads, shared with ``eval``."""
    from ..training.inference import QUANTIZE_CHOICES

    p.add_argument("model", metavar="MODEL_DIR", help="a model directory: float, converted by qlora-rs convert, "
                   "or saved by transformers + bitsandbytes")
    p.add_argument("--adapter", metavar="RUN_DIR", help="a LoRA adapter: a PEFT adapter directory or a qlora-rs "
                   "train output directory (its final adapter, else its newest checkpoint)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                   help="how to load a float MODEL_DIR: auto quantizes it as the adapter's training run did and "
                        "otherwise keeps it in 16 bits; none keeps 16 bits; nf4/fp4 quantize on load. A 4-bit "
                        "MODEL_DIR is always used as stored (default: auto)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the computation and of the unquantized weights (default: bfloat16)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core)")


def load(args: argparse.Namespace):
    import torch

    from ..errors import InvalidArgumentError
    from ..training.inference import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_model(args.model, adapter=args.adapter, quantize=args.quantize, compute_dtype=args.compute_dtype)


def run(args: argparse.Namespace) -> int:
    from ..training.inference import generate

    loaded = load(args)
    print(f"model      {loaded.description}", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        generate(loaded.model, loaded.tokenizer, history + [{"role": "user", "content": args.prompt}],
                 stream=sys.stdout, **options)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message and press Enter; an empty line ends the chat.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        if interactive:
            print("model> ", end="", file=sys.stderr, flush=True)
        answer = generate(loaded.model, loaded.tokenizer, history, stream=sys.stdout, **options)
        history.append({"role": "assistant", "content": answer})
