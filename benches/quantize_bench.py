"""Quantize/dequantize throughput on a 4096x4096 bfloat16 weight: qlora-rs against bitsandbytes'
CPU backend and torchao's NF4, all measured in this run. Prints Mparam/s and ratios.

    python benches/quantize_bench.py [--size 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import qlora_rs


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (and torch.compile for bitsandbytes' CPU dequant)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16)
    mparams = w.numel() / 1e6
    rows: dict[str, dict[str, float]] = {}

    packed, state = qlora_rs.quantize(w, "nf4", 64, double_quant=True)
    rows["qlora-rs"] = {
        "quantize nf4": best_time(lambda: qlora_rs.quantize(w, "nf4", 64, double_quant=False), args.repeat),
        "quantize nf4+dq": best_time(lambda: qlora_rs.quantize(w, "nf4", 64, double_quant=True), args.repeat),
        "dequantize": best_time(lambda: qlora_rs.dequantize(packed, state), args.repeat),
    }

    try:
        import bitsandbytes.functional as F

        bp, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        rows["bitsandbytes"] = {
            "quantize nf4": best_time(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), args.repeat),
            "quantize nf4+dq": best_time(
                lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), args.repeat
            ),
            "dequantize": best_time(lambda: F.dequantize_4bit(bp, bs), args.repeat),
        }
    except ImportError:
        print("bitsandbytes not installed: skipped")

    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:  # torchao < 0.15
            from torchao.dtypes.nf4tensor import to_nf4

        nf4 = to_nf4(w, block_size=64, scaler_block_size=256)
        rows["torchao"] = {
            "quantize nf4+dq": best_time(lambda: to_nf4(w, block_size=64, scaler_block_size=256), args.repeat),
            "dequantize": best_time(lambda: nf4.get_original_weight(), args.repeat),
        }
    except ImportError:
        print("torchao not installed: skipped")

    ops = ["quantize nf4", "quantize nf4+dq", "dequantize"]
    print(f"{args.size}x{args.size} bfloat16, blocksize 64, {qlora_rs.build_info()['threads']} threads, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'Mparam/s':<16}" + "".join(f"{name:>16}" for name in rows))
    for op in ops:
        line = f"{op:<16}"
        for name in rows:
            t = rows[name].get(op)
            line += f"{mparams / t:>16.1f}" if t else f"{'-':>16}"
        print(line)
    ours = rows["qlora-rs"]
    for name in rows:
        if name == "qlora-rs":
            continue
        ratios = [f"{op} {rows[name][op] / ours[op]:.1f}x" for op in ops if op in rows[name]]
        print(f"qlora-rs vs {name}: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
