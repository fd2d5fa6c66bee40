"""Shared pieces of the conversion tests: raw safetensors files, tiny transformers models, and
the bitsandbytes reference conversion (from_pretrained with BitsAndBytesConfig + save_pretrained)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np


def write_raw_safetensors(path: Path, header: Any, data: bytes, *, raw_header: Optional[bytes] = None) -> Path:
    """Writes a safetensors file from a header (dict, or exact bytes) and a data section, without
    any validation, so that malformed files can be built."""
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def write_f32_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A valid safetensors file of float32 arrays (names sorted, contiguous offsets)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    return write_raw_safetensors(path, header, data)


def read_header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), n


def tiny_llama(directory: Path, *, max_shard_size: Optional[str] = None, seed: int = 0) -> Path:
    """A small bf16 Llama saved with save_pretrained. Sizes give partial 4-bit blocks (68 x 300
    is not a multiple of 64) and several nested double-quant blocks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=68, intermediate_size=300, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=256, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def bnb_config(quant_type: str = "nf4", double_quant: bool = True):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def bnb_reference(src: Path, dst: Path, *, quant_type: str = "nf4", double_quant: bool = True, auto_cls: Any = None,
                  max_shard_size: Optional[str] = None):
    """What transformers + bitsandbytes write: load with a 4-bit BitsAndBytesConfig on the CPU,
    save_pretrained. Returns the quantized model."""
    if auto_cls is None:
        from transformers import AutoModelForCausalLM as auto_cls
    model = auto_cls.from_pretrained(src, quantization_config=bnb_config(quant_type, double_quant), device_map="cpu")
    bnb_portable_path(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dst, **kwargs)
    return model


def bnb_portable_path(model):
    """Keeps bitsandbytes' 4-bit layers on their portable CPU path (``dequantize_4bit`` + ``F.linear``),
    so the reference does not depend on the CPU. On CPUs with AVX512-BF16, bitsandbytes 0.50 in
    eval mode repacks each weight for its own CPU kernel, which rounds differently and asserts
    ``out_features % 32 == 0``. Returns the model."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no bitsandbytes 4-bit layers in the reference model"
    for m in layers:
        # A bitsandbytes release without this switch must fail here, not pick a CPU-dependent path.
        assert hasattr(m, "support_avx512bf16_for_cpu"), "bitsandbytes' CPU fast-path switch has moved"
        m.support_avx512bf16_for_cpu = False
    return model


def load_all(directory: Path) -> dict:
    """Every tensor of a checkpoint directory or file, by name."""
    from safetensors.torch import load_file

    files = [directory] if directory.is_file() else sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def tensor_mismatches(ours: dict, ref: dict) -> list[str]:
    """Names whose dtype, shape or bytes differ (or that only one side has)."""
    import torch

    bad = sorted(set(ours) ^ set(ref))
    for k in sorted(set(ours) & set(ref)):
        a, b = ours[k], ref[k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            bad.append(k)
    return bad


def write_synthetic_checkpoint(path: Path, tensors: list[tuple[str, tuple[int, ...]]], *, seed: int = 0,
                               chunk_elements: int = 1 << 20) -> int:
    """Writes a bf16 safetensors file of normal(0, 0.02) values without holding more than one
    chunk in memory (tensors in name order, as save_pretrained writes them). Returns its size."""
    rng = np.random.default_rng(seed)
    # One random chunk reused with a per-chunk sign flip and scale: cheap, finite, not constant.
    base = (rng.standard_normal(chunk_elements).astype(np.float32) * 0.02).view(np.uint32)
    base_bf16 = ((base + 0x7FFF + ((base >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    ordered = sorted(tensors)
    for name, shape in ordered:
        n = int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        k = 0
        for _, shape in ordered:
            left = int(np.prod(shape))
            while left:
                m = min(left, chunk_elements)
                chunk = base_bf16[:m] ^ np.uint16(0x8000 * (k & 1))  # flip the sign of every other chunk
                f.write(chunk.tobytes())
                left -= m
                k += 1
    return 8 + len(h) + offset
