"""4-bit inference kernels on the CPU, every figure measured in this run with the repeats
interleaved (each repeat times every contender once, in turn), so that a machine whose speed
drifts affects all of them alike. Prints medians and ratios:

- matmul ``y = x @ W^T`` for M = 1, 4, 16 rows and W [out x in] = 4096x4096, 4096x14336,
  14336x4096 (NF4, blocksize 64, double quantization, bf16 activations): qlora-rs
  (``torch.ops.qlora_rs.gemm_4bit``, and ``qlora_rs.nn.Linear4bit`` under ``torch.no_grad``)
  against bf16 ``F.linear`` and bitsandbytes' CPU path (``bnb.nn.Linear4bit``, eval mode);
- dequantize 4096x4096 NF4 + double quant to bf16: qlora-rs into a new tensor and into a
  preallocated one, against bitsandbytes' ``dequantize_4bit``; Gparam/s and GB/s (bytes read +
  written);
- ``--crossover``: the fused kernel against dequantize + ``F.linear`` for M = 1..32, the table
  behind ``qlora_rs.ops.CPU_FUSED_GEMM_MAX_M``.

    python benches/cpu_matmul_bench.py [--repeat 7] [--threads 2] [--crossover]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # W [out, in]
ROWS = [1, 4, 16]


def interleaved(contenders: dict, repeat: int) -> dict:
    """Median seconds per call of each contender; repeats interleaved, after one warm-up each."""
    for fn in contenders.values():
        fn()
    times: dict = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bnb_linear(w: torch.Tensor):
    """bitsandbytes' Linear4bit (NF4, double quant, bf16 compute) holding ``w``, in eval mode."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64)
        layer = layer.to("cpu").eval()
    return layer


def quiet(fn):
    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return call


def matmul_table(repeat: int) -> None:
    import qlora_rs
    from qlora_rs.nn import Linear4bit

    print(f"\nmatmul y = x @ W^T, NF4 blocksize 64 + double quant, bf16 x; median ms of {repeat} interleaved repeats")
    print(f"{'W [out x in]':<14}{'M':>3}{'bf16 F.linear':>15}{'bnb':>9}{'qlora op':>10}{'Linear4bit':>12}"
          f"{'op/bf16':>9}{'op/bnb':>8}{'mod/bf16':>10}{'mod/bnb':>9}")
    for n_out, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n_out, k, dtype=torch.bfloat16) * 0.02
        layer = Linear4bit.from_linear(torch.nn.Linear(k, n_out, bias=False, dtype=torch.bfloat16))
        layer.quantize_weight_(w)
        args = qlora_rs.ops.quant_args(layer.packed_weight(), layer.quant_state)
        bnb = bnb_linear(w)
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            contenders = {
                "bf16": lambda: F.linear(x, w),
                "op": lambda: torch.ops.qlora_rs.gemm_4bit(x, *args),
                "module": lambda: layer(x),
            }
            if bnb is not None:
                contenders["bnb"] = quiet(lambda: bnb(x))
            with torch.no_grad():
                t = interleaved(contenders, repeat)
            tb = t.get("bnb", float("nan"))
            print(f"{f'{n_out}x{k}':<14}{m:>3}{t['bf16'] * 1e3:>15.3f}{tb * 1e3:>9.3f}{t['op'] * 1e3:>10.3f}"
                  f"{t['module'] * 1e3:>12.3f}{t['bf16'] / t['op']:>8.2f}x{tb / t['op']:>7.2f}x"
                  f"{t['bf16'] / t['module']:>9.2f}x{tb / t['module']:>8.2f}x")
    print("(ratios: how many times faster qlora-rs is; op = torch.ops.qlora_rs.gemm_4bit, mod = Linear4bit)")


def dequantize_table(repeat: int) -> None:
    import qlora_rs
    from qlora_rs.core import ops

    n_out = k = 4096
    n = n_out * k
    torch.manual_seed(0)
    w = torch.randn(n_out, k, dtype=torch.bfloat16)
    packed, state = qlora_rs.quantize(w, "nf4", 64, double_quant=True)
    args = ops.quant_args(packed, state)
    buffer = torch.empty(n_out, k, dtype=torch.bfloat16)
    contenders = {
        "qlora-rs, new tensor": lambda: torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16),
        "qlora-rs, preallocated": lambda: ops.dequantize_4bit_cpu(*args, torch.bfloat16, out=buffer),
    }
    try:
        import bitsandbytes.functional as BF

        bp, bs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        contenders["bitsandbytes, new tensor"] = lambda: BF.dequantize_4bit(bp, bs)
    except ImportError:
        print("bitsandbytes not installed: skipped")
    t = interleaved(contenders, repeat)
    # Read: n/2 packed bytes + one byte per block + the nested scales; written: 2 bytes a value.
    traffic = n / 2 + n / 64 + n * 2
    print(f"\ndequantize {n_out}x{k} NF4 + double quant -> bf16; median of {repeat} interleaved repeats")
    for name, s in t.items():
        print(f"  {name:<26}{s * 1e3:>8.2f} ms {n / s / 1e9:>7.2f} Gparam/s {traffic / s / 1e9:>7.1f} GB/s")
    if "bitsandbytes, new tensor" in t:
        ref = t["bitsandbytes, new tensor"]
        print(f"qlora-rs vs bitsandbytes: new tensor {ref / t['qlora-rs, new tensor']:.2f}x, "
              f"preallocated {ref / t['qlora-rs, preallocated']:.2f}x")


def crossover_table(repeat: int) -> None:
    import qlora_rs
    from qlora_rs.core import ops

    print(f"\nfused kernel vs dequantize + F.linear (bf16), median ms of {repeat} interleaved repeats; "
          f"ratio > 1: the fused kernel is faster")
    sizes = [1, 2, 4, 6, 8, 10, 12, 16, 24, 32]
    print(f"{'W [out x in]':<14}" + "".join(f"{m:>8}" for m in sizes))
    for n_out, k in SHAPES:
        torch.manual_seed(0)
        packed, state = qlora_rs.quantize(torch.randn(n_out, k, dtype=torch.bfloat16), "nf4", 64, double_quant=True)
        weight = ops.CpuPackedWeight(*ops.quant_args(packed, state))
        line = f"{f'{n_out}x{k}':<14}"
        for m in sizes:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            mm = ops.matmul_dtype(x.dtype, x.device)
            t = interleaved({
                "fused": lambda: weight.fused_matmul(x),
                "decode": lambda: F.linear(x.to(mm), weight.dequantize(mm)).to(x.dtype),
            }, repeat)
            line += f"{t['decode'] / t['fused']:>7.2f}x"
        print(line, flush=True)
    print(f"(in use: CPU_FUSED_GEMM_MAX_M = {ops.CPU_FUSED_GEMM_MAX_M})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (qlora-rs: QLORA_RS_NUM_THREADS)")
    ap.add_argument("--crossover", action="store_true", help="only the fused vs decode + F.linear table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QLORA_RS_NUM_THREADS", str(args.threads))
    import qlora_rs

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
          f"qlora-rs {qlora_rs.__version__} ({qlora_rs.build_info()['threads']} threads, CPU kernels: "
          f"{qlora_rs.ops.cpu_isa()})")
    if args.crossover:
        crossover_table(args.repeat)
        return
    dequantize_table(args.repeat)
    matmul_table(args.repeat)


if __name__ == "__main__":
    main()
