"""Helpers for the loading, quantizer, training and merge tests: tiny Llama model directories
(with a word-level tokenizer built offline) and synthetic safetensors checkpoints written
without holding them in memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional, Sequence

import torch

HIDDEN = 64
LAYERS = 2
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
# A chat template in the usual Jinja form, so {"messages": ...} records render through it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ '</s> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def words_of(texts: Sequence[str]) -> list[str]:
    out: dict[str, None] = {}
    for t in texts:
        for w in t.split():
            out[w] = None
    return list(out)


def save_tokenizer(directory: Path, words: Sequence[str], vocab_size: int, chat_template: Optional[str] = None) -> None:
    """A whitespace word-level tokenizer over ``words`` (padded with filler words to ``vocab_size``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + ["<user>", "<assistant>", "<system>"])}
    for w in words:
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))


def tiny_llama_config(vocab: int = 160, tie: bool = False, hidden: int = HIDDEN, layers: int = LAYERS,
                      intermediate: int = 128, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, architectures=["LlamaForCausalLM"],
    )


def make_tiny_llama(directory: Path, *, vocab: int = 160, tie: bool = False, dtype=torch.bfloat16, seed: int = 0,
                    words: Sequence[str] = (), chat_template: Optional[str] = None) -> Path:
    """Saves a randomly initialized tiny Llama (and a tokenizer) into ``directory``."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab, tie)).to(dtype)
    model.save_pretrained(str(directory))
    save_tokenizer(directory, words, vocab, chat_template)
    return directory


_CONFIG_CLASSES = {"Gemma3": "Gemma3TextConfig"}  # families whose causal LM takes another config than <family>Config


def make_tiny_family(directory: Path, family: str, *, vocab: int = 160, seed: int = 0, **overrides) -> Path:
    """Saves a randomly initialized tiny bf16 model of another Llama-style family (``"Mistral"``,
    ``"Qwen2"``: transformers' ``<family>Config`` and ``<family>ForCausalLM``; ``"Gemma3"``: its
    text config) with the tiny Llama's sizes and ``overrides`` of its config (and a tokenizer)
    into ``directory``."""
    import transformers

    directory = Path(directory)
    sizes = {k: v for k, v in tiny_llama_config(vocab).to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    config = getattr(transformers, _CONFIG_CLASSES.get(family, f"{family}Config"))(**{**sizes, **overrides})
    torch.manual_seed(seed)
    getattr(transformers, f"{family}ForCausalLM")(config).to(torch.bfloat16).save_pretrained(str(directory))
    save_tokenizer(directory, (), vocab)
    return directory


_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_synthetic_checkpoint(directory: Path, config, dtype=torch.float32, seed: int = 0) -> int:
    """Writes ``model.safetensors`` for a Llama ``config`` tensor by tensor (never more than one
    tensor in memory) plus config.json; returns the file size. Values are small random numbers."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = size
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    pattern = (torch.randn(1 << 20, generator=g) * 0.02).to(dtype).view(torch.uint8).numpy().tobytes()
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            nbytes = size
            for s in shape:
                nbytes *= s
            if "norm" in name:
                f.write(torch.ones(nbytes // size, dtype=dtype).view(torch.uint8).numpy().tobytes())
                continue
            # Each tensor starts at another place of the pattern, so the weights differ.
            start = (len(name) * 4099 * size) % len(pattern)
            chunk = pattern[start:] + pattern[:start]
            while nbytes > 0:
                f.write(chunk[:nbytes])
                nbytes -= len(chunk)
    config.save_pretrained(str(directory))
    return (directory / "model.safetensors").stat().st_size
