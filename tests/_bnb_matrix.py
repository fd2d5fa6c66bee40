"""Byte-equality of qlora_rs.quantize with bitsandbytes over the whole format matrix, in this process's
torch CPU capability (set ATEN_CPU_CAPABILITY before starting it). Prints one JSON object:
{"capability": ..., "cases": N, "mismatches": [...]} — run by tests/test_bnb_compat.py once per capability."""

import json
import sys

import torch

import qlora_rs
from qlora_rs import _lib

F = __import__("bitsandbytes.functional", fromlist=["quantize_4bit"])

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rust_offset(absmax: torch.Tensor, threads: int) -> float:
    blocks = absmax.numel()
    q, nested = torch.empty(blocks, dtype=torch.uint8), torch.empty(-(-blocks // 256))
    return _lib.double_quantize(absmax, q, nested, None, threads)


def main() -> None:
    mismatches, cases = [], 0
    gen = torch.Generator().manual_seed(0)
    for qt in ("nf4", "fp4"):
        for bs in BLOCKSIZES:
            # More than 256 blocks (several nested blocks), and an odd size with a partial last block.
            for n in (bs * 300, bs * 3 + 17):
                x32 = torch.randn(n, generator=gen) * torch.rand(1, generator=gen) * 4
                for dtype in DTYPES:
                    x = x32.to(dtype)
                    for dq in (False, True):
                        cases += 1
                        packed, state = qlora_rs.quantize(x, qt, bs, dq)
                        bpacked, bstate = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=dq)
                        ours = [packed, state.absmax] + ([state.nested_absmax, torch.tensor(state.offset)] if dq else [])
                        theirs = [bpacked, bstate.absmax] + ([bstate.state2.absmax, bstate.offset.float()] if dq else [])
                        if not all(a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                                   for a, b in zip(ours, theirs)):
                            mismatches.append(f"{qt} blocksize={bs} n={n} {dtype} double_quant={dq}")
    # Large tensors: more than 32768 blocks, where torch sums the mean on several threads.
    x = torch.randn(64 * 40_001, generator=gen).to(torch.float32)
    for dq in (True,):
        cases += 1
        packed, state = qlora_rs.quantize(x, "nf4", 64, dq)
        bpacked, bstate = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        if not (torch.equal(packed, bpacked) and torch.equal(state.absmax, bstate.absmax)
                and state.offset == bstate.offset.item()):
            mismatches.append("nf4 blocksize=64 n=2560064 float32 double_quant=True")
    # The Rust-only offset (convert without torch) against this process's torch.mean.
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in (7, 1000, 32767, 40001, 100_003):
            absmax = torch.rand(n, generator=gen) * 2
            cases += 1
            if rust_offset(absmax, threads) != absmax.mean().item():
                mismatches.append(f"Rust-only offset n={n} threads={threads}")
    json.dump({"capability": torch.backends.cpu.get_cpu_capability(), "cases": cases, "mismatches": mismatches},
              sys.stdout)


if __name__ == "__main__":
    main()
