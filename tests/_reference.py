"""A small pure-torch reference of the 4-bit format, written from the format description in
DESIGN.md (not from the Rust core), used by the property tests."""

from __future__ import annotations

import torch

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
FP4 = [s * m / 12 for s in (1.0, -1.0) for m in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)]
INT4 = [m / 7 for m in (7, 6, 5, 4, 3, 2, 1, 0)] + [-(m / 7) for m in range(8)]
CODES = {"nf4": NF4, "fp4": FP4, "int4": INT4}


def code(quant_type: str) -> torch.Tensor:
    return torch.tensor(CODES[quant_type], dtype=torch.float32)


def quantize(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 [(n+1)//2, 1] and float32 absmax, nearest code with ties to the lower value."""
    c = code(quant_type)
    flat = x.reshape(-1).float()
    n = flat.numel()
    values, order = torch.sort(c, stable=True)
    bounds = (values[:-1] + values[1:]) / 2
    nibbles = torch.empty(n + (n % 2), dtype=torch.uint8)
    absmax = []
    for start in range(0, n, blocksize):
        block = flat[start : start + blocksize]
        a = block.abs().max()
        full = block.numel() == blocksize
        d = a.clamp(min=1e-38)
        scaled = (block * (1.0 / d) if full else block / d).clamp(-1, 1)
        nibbles[start : start + block.numel()] = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
        absmax.append(a if full else d)
    if n % 2:
        nibbles[n] = order[torch.bucketize(torch.zeros(1), bounds)].to(torch.uint8)
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    return packed.reshape(-1, 1), torch.stack(absmax) if absmax else torch.empty(0)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, n: int,
               dtype: torch.dtype) -> torch.Tensor:
    c = code(quant_type)
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (c[nibbles] * scales).to(dtype)
