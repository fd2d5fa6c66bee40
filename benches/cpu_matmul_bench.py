"""4-bit inference kernels on the CPU, every figure measured in this run with the repeats
interleaved (each repeat gives every contender a turn: calls that settle it in, then timed
calls), so that a machine whose speed drifts affects all of them alike. Prints medians and ratios:

- matmul ``y = x @ W^T`` for M = 1, 4, 16 rows and W [out x in] = 4096x4096, 4096x14336,
  14336x4096 (NF4, blocksize 64, double quantization, bf16 activations): qlora-rs
  (``torch.ops.qlora_rs.gemm_4bit``, and ``qlora_rs.nn.Linear4bit`` under ``torch.no_grad``)
  against bf16 ``F.linear`` and bitsandbytes' CPU path (``bnb.nn.Linear4bit``, eval mode). Each
  contender cycles through enough copies of its weight that its bytes overflow the last-level
  cache eight times over (the bf16 copies, and the 4-bit ones, whose op and module contenders start half
  a cycle apart so that neither reads a weight the other has just brought in), as the layers of a
  model do during generation: a weight repeated from cache would time the cache, not the bytes a
  quarter-size format saves (``--warm`` keeps one copy);
- dequantize 4096x4096 NF4 + double quant to bf16: qlora-rs into a new tensor (the op, its output
  on memory the freed outputs before it used: ``qlora_rs.core.memory``; and, for comparison, on a
  new allocation each call, as before that pool) and into a preallocated one (``ops.dequantize_4bit_cpu(..., out=)``: the weight checked once and its block
  scales decoded to float32 once, as every CPU entry point keeps them; and, for comparison, a weight
  checked and its double-quantized scales decoded in every call), against bitsandbytes'
  ``dequantize_4bit`` (into a new tensor: its CPU path takes no ``out``); Gparam/s and GB/s (bytes read + written), and the anchor the machine sets:
  torch copying a bf16 tensor of the output's size;
- above the crossover (M = 128, 512): the op, whose decode goes into a buffer it reuses, against
  the same decode into a new tensor;
- ``--crossover``: the fused kernel against the decode (into the reused buffer, as the op does
  above the limit) + ``F.linear`` for M = 1..64, the table behind ``qlora_rs.ops.CPU_FUSED_GEMM_MAX_M``.

    python benches/cpu_matmul_bench.py [--repeat 7] [--threads 2] [--crossover | --dequantize]
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

# How many times over the copies a contender cycles through overflow the last-level cache. Twice
# was not enough: a cache that keeps part of a cyclic stream (AMD's last level does) still served
# much of it. On a 2-core Zen 5 with 32 MiB (M = 1, 4096x4096, calls of one kind back to back for
# 8 cycles, then 4 timed): at twice, bf16 F.linear read its 32 MiB weight at 63-87 GB/s and the op
# its 8.4 MB at 57-59, above what this machine reads from memory, and this benchmark's interleaved
# figure (0.36-0.54 ms bf16, 0.17-0.23 op: 2.11-2.36x) differed from those steady ones (2.49-3.51x)
# with the order of the contenders; at four times 56 and 47 GB/s (2.69x interleaved, 3.17x
# steady); at eight times 51-52 and 41-42 GB/s in two runs, and the interleaved figures matched
# the steady ones (2.95x and 3.03x; 3.03x and 3.04x).
CACHE_MULTIPLE = 8


def interleaved(contenders: dict, repeat: int, run: int = 1, settle: int = 1) -> dict:
    """Median seconds per call of each contender. Each repeat gives every contender a turn (each
    repeat starting one contender later): ``settle`` untimed calls, then ``run`` timed ones. The
    untimed calls are those that follow another contender and find the caches as that one left
    them (the first 4-bit product after bf16 ``F.linear`` read 32 MiB took ~0.12 ms more than the
    next at M = 1 on 4096x4096, and the next seven of a cycle of eight copies still 20-40 us more
    than after a pause); the timed ones follow calls of their own kind, as a model's layers follow
    each other."""
    for fn in contenders.values():
        fn()
    times: dict = {name: [] for name in contenders}
    items = list(contenders.items())
    for r in range(repeat):
        for name, fn in items[r % len(items):] + items[:r % len(items)]:
            for _ in range(settle):
                fn()
            for _ in range(run):
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


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs), or 256 MiB when the system does not say."""
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=256 * 2**20)


def cycling(make, copies: int, start: int = 0):
    """A contender calling ``make(i)()`` for copy i = start, start + 1, ... (mod copies) in turn."""
    fns = [make(i) for i in range(copies)]
    turn = [start]

    def call():
        turn[0] = (turn[0] + 1) % copies
        return fns[turn[0]]()
    return call


def matmul_table(repeat: int, warm: bool) -> None:
    import qlora_rs
    from qlora_rs.nn import Linear4bit

    cache = last_level_cache_bytes()
    print(f"\nmatmul y = x @ W^T, NF4 blocksize 64 + double quant, bf16 x; median ms of {repeat} interleaved repeats")
    print("weights " + ("repeated (cache-warm)" if warm else
                        f"cycled through copies whose bytes (bf16; 4-bit) exceed {CACHE_MULTIPLE} times the "
                        f"{cache / 2**20:.0f} MiB last-level cache"))
    print(f"{'W [out x in]':<14}{'M':>3}{'bf16 F.linear':>15}{'bnb':>9}{'qlora op':>10}{'Linear4bit':>12}"
          f"{'op/bf16':>9}{'op/bnb':>8}{'mod/bf16':>10}{'mod/bnb':>9}")
    for n_out, k in SHAPES:
        # bf16 (and bitsandbytes, much slower either way) copies by the bf16 bytes; ours by the
        # packed bytes, op and module half a cycle apart (when there are two copies or more).
        copies = 1 if warm else -(-CACHE_MULTIPLE * cache // (2 * n_out * k))
        copies4 = 1 if warm else -(-CACHE_MULTIPLE * cache // (n_out * k // 2))
        ws, bnbs, layers, argss = [], [], [], []
        for c in range(max(copies, copies4)):
            torch.manual_seed(c)
            w = torch.randn(n_out, k, dtype=torch.bfloat16) * 0.02
            if c < copies4:
                layer = Linear4bit.from_linear(torch.nn.Linear(k, n_out, bias=False, dtype=torch.bfloat16))
                layer.quantize_weight_(w)
                layers.append(layer)
                argss.append(qlora_rs.ops.quant_args(layer.packed_weight(), layer.quant_state))
            if c < copies:
                ws.append(w)
                bnbs.append(bnb_linear(w))
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            contenders = {
                "bf16": cycling(lambda i: lambda: F.linear(x, ws[i]), copies),
                "op": cycling(lambda i: lambda: torch.ops.qlora_rs.gemm_4bit(x, *argss[i]), copies4),
                "module": cycling(lambda i: lambda: layers[i](x), copies4, start=copies4 // 2),
            }
            if bnbs[0] is not None:
                contenders["bnb"] = quiet(cycling(lambda i: lambda: bnbs[i](x), copies))
            with torch.no_grad():
                # A whole cycle of copies settles (what the contender before left in the caches
                # and TLBs weighs on more than one call), then a whole cycle is timed.
                t = interleaved(contenders, repeat, run=max(copies, copies4), settle=max(copies, copies4))
            tb = t.get("bnb", float("nan"))
            print(f"{f'{n_out}x{k}':<14}{m:>3}{t['bf16'] * 1e3:>15.3f}{tb * 1e3:>9.3f}{t['op'] * 1e3:>10.3f}"
                  f"{t['module'] * 1e3:>12.3f}{t['bf16'] / t['op']:>8.2f}x{tb / t['op']:>7.2f}x"
                  f"{t['bf16'] / t['module']:>9.2f}x{tb / t['module']:>8.2f}x")
    print("(ratios: how many times faster qlora-rs is; op = torch.ops.qlora_rs.gemm_4bit, mod = Linear4bit)")


def dequantize_table(repeat: int) -> None:
    import qlora_rs
    from qlora_rs.core import memory, ops

    n_out = k = 4096
    n = n_out * k
    torch.manual_seed(0)
    w = torch.randn(n_out, k, dtype=torch.bfloat16)
    packed, state = qlora_rs.quantize(w, "nf4", 64, double_quant=True)
    args = ops.quant_args(packed, state)
    buffer = torch.empty(n_out, k, dtype=torch.bfloat16)
    source = torch.randn(n_out, k, dtype=torch.bfloat16)

    def fresh_memory():
        """The op as before its output pool: each output a new allocation, its pages untouched."""
        pool_min, memory.POOL_MIN_BYTES = memory.POOL_MIN_BYTES, 1 << 62
        try:
            return torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16)
        finally:
            memory.POOL_MIN_BYTES = pool_min

    contenders = {
        "torch copy_ (anchor)": lambda: buffer.copy_(source),
        "qlora-rs, new tensor": lambda: torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16),
        "new tensor, fresh memory": fresh_memory,
        "qlora-rs, preallocated": lambda: ops.dequantize_4bit_cpu(*args, torch.bfloat16, out=buffer),
        "prealloc., checked every call": lambda: ops.CpuPackedWeight(*args).dequantize(torch.bfloat16, out=buffer),
    }
    try:
        import bitsandbytes.functional as BF

        bp, bs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        contenders["bitsandbytes, new tensor"] = lambda: BF.dequantize_4bit(bp, bs)  # its CPU path has no out=
    except ImportError:
        print("bitsandbytes not installed: skipped")
    t = interleaved(contenders, repeat, run=3)
    # Read: n/2 packed bytes + one byte per block + the nested scales; written: 2 bytes a value.
    traffic = n / 2 + n / 64 + n * 2
    print(f"\ndequantize {n_out}x{k} NF4 + double quant -> bf16; median of {repeat} interleaved repeats")
    for name, s in t.items():
        moved = 4 * n if name.startswith("torch copy_") else traffic
        print(f"  {name:<31}{s * 1e3:>8.2f} ms {n / s / 1e9:>7.2f} Gparam/s {moved / s / 1e9:>7.1f} GB/s")
    print(f"preallocated dequantize vs this machine's bf16 copy of the same output: "
          f"{t['torch copy_ (anchor)'] / t['qlora-rs, preallocated']:.2f}x")
    if "bitsandbytes, new tensor" in t:
        ref = t["bitsandbytes, new tensor"]
        print(f"qlora-rs vs bitsandbytes: new tensor {ref / t['qlora-rs, new tensor']:.2f}x (fresh memory "
              f"{ref / t['new tensor, fresh memory']:.2f}x), preallocated {ref / t['qlora-rs, preallocated']:.2f}x")


def large_m_table(repeat: int) -> None:
    """Above the crossover: the op (the weight decoded into the thread's reused buffer) against
    the same decode into a new tensor, then the same ``F.linear``."""
    import qlora_rs
    from qlora_rs.core import ops

    print(f"\nabove the crossover (M > {ops.CPU_FUSED_GEMM_MAX_M}): decode + F.linear, median ms of {repeat} "
          f"interleaved repeats")
    print(f"{'W [out x in]':<14}{'M':>5}{'new tensor':>12}{'qlora op':>10}{'ratio':>8}")
    for n_out, k in SHAPES + [(1536, 576)]:
        torch.manual_seed(0)
        packed, state = qlora_rs.quantize(torch.randn(n_out, k, dtype=torch.bfloat16), "nf4", 64, double_quant=True)
        args = ops.quant_args(packed, state)
        weight = ops.cpu_weight(*args)
        for m in (128, 512):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            mm = ops.matmul_dtype(x.dtype, x.device)
            t = interleaved({
                "new": lambda: F.linear(x.to(mm), weight.dequantize(mm)).to(x.dtype),
                "op": lambda: torch.ops.qlora_rs.gemm_4bit(x, *args),
            }, repeat, run=3)
            print(f"{f'{n_out}x{k}':<14}{m:>5}{t['new'] * 1e3:>12.2f}{t['op'] * 1e3:>10.2f}{t['new'] / t['op']:>7.2f}x",
                  flush=True)
    print("(ratio: how many times faster the op is; the same bits either way)")


def crossover_table(repeat: int) -> None:
    import qlora_rs
    from qlora_rs.core import ops

    print(f"\nfused kernel vs dequantize + F.linear (bf16), median ms of {repeat} interleaved repeats; "
          f"ratio > 1: the fused kernel is faster")
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    print(f"{'W [out x in]':<14}" + "".join(f"{m:>8}" for m in sizes))
    for n_out, k in SHAPES:
        torch.manual_seed(0)
        packed, state = qlora_rs.quantize(torch.randn(n_out, k, dtype=torch.bfloat16), "nf4", 64, double_quant=True)
        weight = ops.CpuPackedWeight(*ops.quant_args(packed, state))
        line = f"{f'{n_out}x{k}':<14}"
        for m in sizes:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            t = interleaved({
                "fused": lambda: weight.fused_matmul(x),
                "decode": lambda: weight.decoded_matmul(x),
            }, repeat)
            line += f"{t['decode'] / t['fused']:>7.2f}x"
        print(line, flush=True)
    print(f"(in use: CPU_FUSED_GEMM_MAX_M = {ops.CPU_FUSED_GEMM_MAX_M})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (qlora-rs: QLORA_RS_NUM_THREADS)")
    ap.add_argument("--crossover", action="store_true", help="only the fused vs decode + F.linear table")
    ap.add_argument("--dequantize", action="store_true", help="only the dequantize table")
    ap.add_argument("--warm", action="store_true", help="matmul: repeat one weight (cache-warm) instead of cycling copies")
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
    if args.dequantize:
        return
    matmul_table(args.repeat, args.warm)
    large_m_table(args.repeat)


if __name__ == "__main__":
    main()
