"""The 8-bit blockwise codec of optimizer states (blocks of 256, one float32 absmax per block).

The first moment uses the core's signed dynamic map, the second moment the unsigned one. On the
CPU the Rust core encodes and decodes (:func:`qlora_rs.functional.quantize_blockwise_8bit`). On
CUDA the same encoding runs as torch operations on the device, because the state never leaves
the GPU during a step. It reproduces the core's encoder step for step: each value is multiplied
by the float32 reciprocal of its block's absmax, clamped to [-1, 1], snapped to one of 65536
grid points (``(x + 1) * 0.5 * 65535 + 0.5`` rounded once to float32, then truncated), and the
grid point's code is read from a table. That table is not recomputed here: it is read from the
Rust core by encoding the 65536 grid points themselves, so both paths give the same bytes
(``tests/test_optim.py`` checks this on the CPU, where both can run). Decoding is
``map[code] * absmax`` in float32 on both.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _lib
from ..core.functional import dequantize_blockwise_8bit, quantize_blockwise_8bit

BLOCKSIZE = 256
_GRID_POINTS = 65536
# Elements per chunk of the CUDA path: bounds its temporaries (a float64 one among them).
_CHUNK = 1 << 20


def _grid_values() -> torch.Tensor:
    """Grid point k is ``-1 + 2k / 65535`` computed in float32, as the core computes it."""
    k = torch.arange(_GRID_POINTS, dtype=torch.float32)
    return (k + k) / float(_GRID_POINTS - 1) - 1.0


def grid_index(normed: torch.Tensor) -> torch.Tensor:
    """The grid point (int64) each normalised float32 value snaps to (any device)."""
    x = normed.clamp(-1.0, 1.0)  # NaN passes through, as in the core
    half = (x + 1.0) * 0.5
    # Exact in float64 (half is a multiple of 2^-25), so the cast is the one rounding of the
    # core's fused multiply-add.
    scaled = (half.double() * float(_GRID_POINTS - 1) + 0.5).float()
    idx = torch.where(torch.isnan(scaled), torch.zeros_like(scaled), scaled).to(torch.int64)
    return idx & (_GRID_POINTS - 1)


class StateCodec:
    """Encoder/decoder for one kind of state: ``signed`` (first moment) or unsigned (second)."""

    def __init__(self, signed: bool) -> None:
        self.signed = signed
        self.map = torch.tensor(_lib.dynamic_map(signed), dtype=torch.float32)
        self._table: Optional[torch.Tensor] = None
        self._zero_code: Optional[int] = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def zero_code(self) -> int:
        """The code the core stores for an all-zero block (decodes to exactly 0)."""
        if self._zero_code is None:
            codes, _ = quantize_blockwise_8bit(torch.zeros(BLOCKSIZE), self.map, BLOCKSIZE)
            self._zero_code = int(codes[0])
        return self._zero_code

    @property
    def table(self) -> torch.Tensor:
        """uint8 [65536]: the core's code for each grid point."""
        if self._table is None:
            grid = _grid_values()
            if not torch.equal(grid_index(grid), torch.arange(_GRID_POINTS)):
                raise RuntimeError("qlora_rs internal error: the 8-bit grid does not round-trip")
            # Blocks of 256 holding 1.0 and 255 grid values: absmax 1, reciprocal 1, so each grid
            # value is encoded as it is.
            per = BLOCKSIZE - 1
            blocks = -(-_GRID_POINTS // per)
            values = torch.zeros(blocks * per)
            values[:_GRID_POINTS] = grid
            x = torch.cat([torch.ones(blocks, 1), values.view(blocks, per)], dim=1)
            codes, absmax = quantize_blockwise_8bit(x.view(-1), self.map, BLOCKSIZE)
            if not torch.equal(absmax, torch.ones(blocks)):
                raise RuntimeError("qlora_rs internal error: an 8-bit grid block has absmax != 1")
            self._table = codes.view(blocks, BLOCKSIZE)[:, 1:].reshape(-1)[:_GRID_POINTS].clone()
        return self._table

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.map.to(device), self.table.to(device))
        return self._on_device[device]

    def blocks(self, numel: int) -> int:
        return -(-numel // BLOCKSIZE)

    def quantize_into(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """Encodes float32 ``x`` into ``codes`` (uint8, same number of elements) and ``absmax``
        (float32 [blocks]), in place. On the CPU a non-finite value raises
        :class:`~qlora_rs.NonFiniteError` (from the core) before anything is written; on CUDA it
        shows as a non-finite absmax, which the caller checks."""
        if x.device.type == "cpu":
            q, a = quantize_blockwise_8bit(x.reshape(-1), self.map, BLOCKSIZE)
            codes.view(-1).copy_(q)
            absmax.copy_(a)
            return
        self._quantize_torch(x.reshape(-1), codes.view(-1), absmax)

    def _quantize_torch(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        _, table = self._device_tables(x.device)
        x = x.float()
        n = x.numel()
        for start in range(0, n, _CHUNK):
            xs = x[start : start + _CHUNK]
            m = xs.numel()
            nb = self.blocks(m)
            pad = nb * BLOCKSIZE - m
            xb = (torch.nn.functional.pad(xs, (0, pad)) if pad else xs).view(nb, BLOCKSIZE)
            a = xb.abs().amax(dim=1)
            absmax[start // BLOCKSIZE : start // BLOCKSIZE + nb].copy_(a)
            normed = xb * torch.reciprocal(a).unsqueeze(1)
            c = table[grid_index(normed)]
            c = torch.where((a == 0).unsqueeze(1), torch.full_like(c, self.zero_code), c)
            codes[start : start + m].copy_(c.view(-1)[:m])

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """float32 tensor of ``codes.shape``: ``map[code] * absmax[block]``."""
        if codes.device.type == "cpu":
            return dequantize_blockwise_8bit(codes, absmax, self.map, BLOCKSIZE)
        return self._dequantize_torch(codes, absmax)

    def _dequantize_torch(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        cmap, _ = self._device_tables(codes.device)
        flat = codes.reshape(-1)
        n = flat.numel()
        nb = self.blocks(n)
        out = torch.empty(nb * BLOCKSIZE, dtype=torch.float32, device=codes.device)
        out[:n] = cmap[flat.long()]
        out[n:] = 0.0
        out.view(nb, BLOCKSIZE).mul_(absmax.unsqueeze(1))
        return out[:n].view(codes.shape)


SIGNED = StateCodec(signed=True)
UNSIGNED = StateCodec(signed=False)
