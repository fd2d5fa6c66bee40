"""Held-out loss and perplexity of a causal language model on a file: the number ``qlora-rs eval``,
the demo and the benchmarks report.

- A JSONL file in one of the training formats (see :mod:`qlora_rs.data`) is scored as training
  scores it: the loss is on the response / assistant tokens (every token for ``{"text": ...}``),
  each example cut to ``seq_len`` tokens.
- Any other file is plain text: tokenized whole (no special tokens), cut into consecutive windows
  of ``seq_len`` tokens; every token of a window but its first is predicted from those before it
  in the same window.

The loss is the mean negative log-likelihood per predicted token (natural log) over the whole file;
the perplexity is its exponential.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F

from ..io.data import IGNORE_INDEX, collate, load_dataset
from ..errors import FormatError, InvalidArgumentError

__all__ = ["EvalResult", "evaluate_path", "loss_sum", "JSONL_SUFFIXES"]

JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class EvalResult:
    """Mean loss per predicted token, its perplexity, and what was scored."""

    path: str
    kind: str  # "jsonl" or "text"
    loss: float
    tokens: int
    sequences: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "loss": self.loss, "perplexity": self.perplexity,
                "tokens": self.tokens, "sequences": self.sequences}


def loss_sum(model: Any, batch: dict, device: Any) -> torch.Tensor:
    """Summed next-token cross entropy over the labelled tokens of a collated batch (float32 logits)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _text_windows(tokenizer: Any, path: Path, seq_len: int) -> list:
    from ..io.data import Example

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise FormatError(f"{path}: {len(ids)} token(s) of text; evaluation needs at least 2")
    return [Example(ids[i:i + seq_len], ids[i:i + seq_len], i // seq_len + 1)
            for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]


@torch.no_grad()
def evaluate_path(
    model: Any,
    tokenizer: Any,
    path: Union[str, os.PathLike],
    *,
    seq_len: int = 512,
    batch_size: int = 4,
) -> EvalResult:
    """Mean loss and perplexity of ``model`` on the JSONL or plain-text file ``path`` (see the
    module docstring). The model is put in eval mode for the call."""
    if seq_len < 2 or batch_size < 1:
        raise InvalidArgumentError(f"seq_len must be >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix.lower() in JSONL_SUFFIXES:
        kind, examples = "jsonl", load_dataset(p, tokenizer, seq_len).examples
    else:
        kind, examples = "text", _text_windows(tokenizer, p, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        # Similar lengths together: less padding to compute.
        ordered = sorted(examples, key=lambda e: len(e.input_ids))
        for i in range(0, len(ordered), batch_size):
            batch = collate(ordered[i:i + batch_size], pad)
            total += float(loss_sum(model, batch, device))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return EvalResult(str(p), kind, total / max(count, 1), count, len(examples))
