"""``qlora-rs eval MODEL_DIR DATA [--adapter RUN_DIR]``: the mean loss per predicted token and the
perplexity of a model (and adapter) on DATA. A ``.jsonl`` DATA in the training formats is scored as
training scores it (loss on the responses / assistant turns); any other file is plain text, scored
in consecutive windows of ``--seq-len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .chat import add_model_arguments, load

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="mean loss and perplexity of a model (and adapter) on a JSONL or text file",
                              description=__doc__.replace("``", "'"))
    add_model_arguments(p)
    p.add_argument("data", metavar="DATA", help="a JSONL file in a training format, or a plain-text file")
    p.add_argument("--seq-len", type=int, default=512, metavar="N",
                   help="tokens per text window, or the cut-off of each JSONL example (default: 512)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="sequences per forward pass (default: 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..training.evaluation import evaluate_path

    loaded = load(args)
    result = evaluate_path(loaded.model, loaded.tokenizer, args.data, seq_len=args.seq_len, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(dict(result.as_dict(), model=loaded.description)))
    else:
        print(f"model      {loaded.description}", file=sys.stderr)
        print(f"{result.path}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
              f"({result.tokens} tokens predicted in {result.sequences} {'examples' if result.kind == 'jsonl' else 'windows'})")
    return 0
