"""Models for generation and evaluation: a float, converted or bitsandbytes-saved checkpoint, with an
optional LoRA adapter (a PEFT adapter directory, or a ``qlora-rs train`` run), and greedy or sampled
generation through the tokenizer's chat template, streamed token by token.

The base is loaded the way the adapter was trained on it: a 4-bit checkpoint as stored; a float
checkpoint quantized as the run's ``train_config.json`` says (``qlora-rs train`` quantizes a float
base on load), or kept in 16 bits when there is no adapter or the adapter does not say.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Union

import torch

from ..errors import FormatError, InvalidArgumentError

__all__ = ["LoadedModel", "load_model", "adapter_directory", "run_quantization", "chat_prompt", "generate"]

QUANTIZE_CHOICES = ("auto", "none", "nf4", "fp4")
RUN_CONFIG = "train_config.json"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedModel:
    """A model ready for inference, its tokenizer, and how it was loaded (for reports)."""

    model: Any
    tokenizer: Any
    description: str


def adapter_directory(path: Union[str, os.PathLike]) -> Path:
    """The adapter files of ``path``: a PEFT adapter directory, or a ``qlora-rs train`` run (its final
    adapter sits in the run directory; without one, its newest ``checkpoint-<step>``)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such adapter directory")
    if (p / ADAPTER_CONFIG).is_file():
        return p
    from .train import latest_checkpoint

    newest = latest_checkpoint(p)
    if newest is not None and (newest / ADAPTER_CONFIG).is_file():
        return newest
    raise FileNotFoundError(f"{p}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory or a qlora-rs train run)")


def run_quantization(adapter_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The quantization a ``qlora-rs train`` run applied to a float base (its ``train_config.json``
    sits in the adapter directory, or above a ``checkpoint-<step>``); None if unknown."""
    d = Path(adapter_dir)
    for directory in (d, d.parent):
        f = directory / RUN_CONFIG
        if f.is_file():
            try:
                c = json.loads(f.read_text(encoding="utf-8"))
                return {"quant_type": c["quant_type"], "blocksize": int(c["blocksize"]),
                        "double_quant": bool(c["double_quant"])}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{f}: not a qlora-rs run configuration ({e})") from None
    return None


def load_model(
    model_dir: Union[str, os.PathLike],
    *,
    adapter: Optional[Union[str, os.PathLike]] = None,
    quantize: str = "auto",
    compute_dtype: Any = torch.bfloat16,
    device: Any = "cpu",
) -> LoadedModel:
    """Loads ``model_dir`` (float, converted by ``qlora-rs convert``, or saved by transformers +
    bitsandbytes) and its tokenizer, with ``adapter`` applied when given.

    ``quantize``: ``"auto"`` (a 4-bit checkpoint as stored; a float one as the adapter's run
    quantized it, else in 16 bits), ``"none"`` (refused for a 4-bit checkpoint), ``"nf4"`` or ``"fp4"``
    (a float checkpoint quantized on load, double quantization, block size 64)."""
    from transformers import AutoTokenizer

    from ..surgery.adapter import load_adapter
    from ..api.loading import from_pretrained
    from ..io.checkpoint import Checkpoint
    from ..core.quant_state import parse_dtype

    if quantize not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    compute = parse_dtype(compute_dtype)
    adapter_dir = adapter_directory(adapter) if adapter is not None else None
    with Checkpoint(path) as ckpt:
        stored_4bit = bool(ckpt.quantized_weights())
    if stored_4bit:
        if quantize == "none":
            raise InvalidArgumentError(f"{path} is a 4-bit checkpoint; quantize='none' needs a float one")
        quantization: Any = None  # as stored
        how = "4-bit as stored"
    else:
        wanted = quantize
        if wanted == "auto":
            recorded = run_quantization(adapter_dir) if adapter_dir is not None else None
            quantization = dict(recorded, compute_dtype=compute) if recorded else False
        elif wanted == "none":
            quantization = False
        else:
            quantization = {"quant_type": wanted, "blocksize": 64, "double_quant": True, "compute_dtype": compute}
        how = "16-bit" if quantization is False else f"quantized on load to {quantization['quant_type']}"
    model = from_pretrained(path, quantization=quantization, compute_dtype=compute, dtype=compute, device=device)
    if adapter_dir is not None:
        # A 4-bit model's adapters in float32, as training keeps them and PEFT loads them (its
        # autocast_adapter_dtype): the CPU inference path adds their share by one Rust call.
        load_adapter(model, adapter_dir, lora_dtype=compute if quantization is False else torch.float32)
        how += f", adapter {adapter_dir}"
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(model, tokenizer, f"{path} ({how})")


def chat_prompt(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template and the assistant's
    turn opened; without a template, ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: Optional[TextIO] = None,
    seed: Optional[int] = None,
) -> str:
    """The assistant's answer to ``messages``: greedy when ``temperature`` is 0, else sampled with
    ``temperature`` and nucleus ``top_p``. With ``stream``, the text is written there as it is
    decoded. Generation stops at the tokenizer's end-of-turn token or after ``max_new_tokens``."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    ids = torch.tensor([chat_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    streamer = None
    if stream is not None:

        class _To(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

        streamer = _To(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    eos = [t for t in {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
           if t is not None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                         eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _as_list(v: Any) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]
