"""Kernel variants against the shipped kernels, on a lent GPU, in one harness (see gpu_variants.cu).

    nvcc -arch=sm_90 -O3 -cubin -o .gpuexp/variants.cubin benches/gpu_variants.cu   # here
    python3 benches/gpu_variants.py --cubin .gpuexp/variants.cubin --out $OUT        # there

Every variant is checked before it is timed: the dequantize kernel bit for bit against the
library's, GEMM variants against a float64 product of the same dequantized weight (within twice the
error of torch's own bf16 product), outputs poisoned with NaN first. Timing: CuPy graphs of 40
launches replayed between events, inputs rotated past the L2 cache; torch's anchors (bf16 matmul,
a device copy) through torch's graphs, as benches/gpu_check.py times them. Needs qlora_rs, CuPy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (benches/gpu_check.py: the same timing and shapes)
from gpu_check import SHAPES, copies_for  # noqa: E402


#: More weight shapes [out, in]: grouped-query key/value projections (Llama 3 8B), and a wider one.
EXTRA_SHAPES = [(1024, 4096), (8192, 4096)]


def p(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


class Timer:
    def __init__(self, cp):
        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)

    def cupy_graph(self, launches, calls=40, reps=7) -> float:
        """Median microseconds per launch of ``launches`` (cycled), replayed as a CuPy graph."""
        cp, s = self.cp, self.stream
        torch.cuda.synchronize()
        with s:
            for f in launches:
                f()
            s.synchronize()
            s.begin_capture()
            for i in range(calls):
                launches[i % len(launches)]()
            g = s.end_capture()
        g.launch(stream=s)
        s.synchronize()
        times = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(s)
            g.launch(stream=s)
            b.record(s)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) * 1000.0 / calls)
        return statistics.median(times)

    @staticmethod
    def torch_graph(fns) -> float:
        """Median microseconds per call of torch work, timed as benches/gpu_check.py times it."""
        ctx = gpu_check.Ctx(1e9, False, Path("."))
        ctx.current = "torch"
        ctx.results["torch"] = {"rows": [], "notes": []}
        us, mode = ctx.time_calls(fns)
        if mode != "graph":
            print(f"torch anchor timed eagerly: {ctx.results['torch']['notes']}", flush=True)
        return us


def quantized(w: torch.Tensor):
    import qlora_rs

    packed, st = qlora_rs.quantize(w.cpu(), quant_type="nf4", blocksize=64, double_quant=True)
    return (packed.cuda().reshape(-1), st.absmax.cuda(), st.nested_absmax.cuda(), st.nested_code.cuda(),
            float(st.offset))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cubin", default=".gpuexp/variants.cubin")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_variants: no CUDA device: nothing to time")
        return 2
    try:
        import cupy as cp
    except ImportError as e:
        print(f"gpu_variants: needs CuPy (the GPU image has it): {e}")
        return 2

    from qlora_rs.core import cuda_ops as co

    mod = cp.RawModule(path=a.cubin)
    fn = {}

    def kern(name):
        if name not in fn:
            fn[name] = mod.get_function(name)
        return fn[name]

    timer = Timer(cp)
    rows: list[dict] = []
    bad: list[str] = []
    torch.manual_seed(0)
    started = time.monotonic()

    def emit(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        (out_dir / "variants.json").write_text(json.dumps(rows, indent=1))

    for n, k in SHAPES + EXTRA_SHAPES:
        w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        q = quantized(w)
        packed, absmax, nabs, ncode, offset = q
        ref_w = co.dequantize_4bit_cuda(packed, absmax, nabs, ncode, offset, "nf4", 64, [n, k], torch.bfloat16)
        nel = n * k
        moved = packed.numel() + absmax.numel() + nabs.numel() * 4 + nel * 2
        c = copies_for(packed.numel())
        sets = [tuple(t.clone() for t in q[:4]) for _ in range(c)]
        outs = [torch.empty(nel, dtype=torch.bfloat16, device="cuda") for _ in range(c)]

        # ---- dequantize: the shipped kernel against torch's copy of the same bytes.
        def dq_shipped(i):
            s, o = sets[i], outs[i]
            words = -(-nel // 8)
            return lambda: kern("qlora_dequantize_4bit_bf16")(
                (math.ceil(words / 1024),), (256,),
                (p(s[0]), p(s[1]), p(s[2]), p(s[3]), np.float32(offset), np.int32(1), np.uint64(nel), np.int32(0),
                 np.int32(6), p(o), np.int32(1)))

        pairs = [(torch.empty(moved // 2, dtype=torch.uint8, device="cuda"),
                  torch.empty(moved // 2, dtype=torch.uint8, device="cuda")) for _ in range(copies_for(moved))]
        copy_us = timer.torch_graph([lambda pr=pr: pr[1].copy_(pr[0]) for pr in pairs])
        for name, make in [("shipped", dq_shipped)]:
            outs[0].fill_(float("nan"))
            make(0)()
            torch.cuda.synchronize()
            exact = torch.equal(outs[0].view(torch.int16), ref_w.reshape(-1).view(torch.int16))
            if not exact:
                bad.append(f"dequant {name} {n}x{k}")
            us = timer.cupy_graph([make(i) for i in range(c)])
            emit(kind="dequant", shape=f"{n}x{k}", variant=name, exact=exact, us=round(us, 2),
                 gbps=round(moved / us / 1e3, 1), vs_copy=round(copy_us / us, 3), copy_gbps=round(moved / copy_us / 1e3, 1))
        del outs, pairs

        # ---- small-M GEMM: the shipped mma and GEMV instances and the GEMV variants, against torch bf16.
        ws = [w.clone() for _ in range(copies_for(nel * 2))]
        for m in (1, 4, 8, 12, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = x.double() @ ref_w.double().t()
            budget = ((x @ ref_w.t()).double() - ref).norm().item() / ref.norm().item()
            torch_us = Timer.torch_graph([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])
            y = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in range(c)]

            def gemm_args(i):
                s = sets[i]
                return (p(x), p(s[0]), p(s[1]), p(s[2]), p(s[3]), np.float32(offset), np.int32(1), np.int32(m),
                        np.int32(n), np.int32(k), np.int32(0), np.int32(6), p(y[i]))

            groups = math.ceil(n / 16)
            variants = [(f"shipped mma/{wp}w", "qlora_gemm_4bit_mma_bf16", (math.ceil(n / 32),), (32 * wp,), wp * 2048)
                        for wp in (4, 16)]
            if m <= 8:
                for wp in (8, 16, 32):
                    variants.append((f"shipped gemv w{wp}", f"qlora_gemm_4bit_gemv_w{wp}_bf16", (groups,), (32 * wp,),
                                     0))
                for wp, u in [(4, 2), (8, 1), (16, 2), (32, 2)]:
                    variants.append((f"gemv w{wp} u{u}", f"qexp_gemv_w{wp}_u{u}", (groups,), (32 * wp,), 0))
            for wp in (8, 16, 32):  # up to 16 rows: two n8 tiles of x per decoded A fragment
                variants.append((f"gemv m16 w{wp}", f"qexp_gemv_w{wp}_m16", (groups,), (32 * wp,), 0))
            for name, kname, grid, block, shm in variants:
                def make(i, kname=kname, grid=grid, block=block, shm=shm):
                    return lambda: kern(kname)(grid, block, gemm_args(i), shared_mem=shm)

                y[0].fill_(float("nan"))
                make(0)()
                torch.cuda.synchronize()
                got = y[0].double()
                err = ((got - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(got).all()) and err <= 2 * budget + 1e-6
                if not ok:
                    bad.append(f"gemm {name} {n}x{k} m={m} err={err:.3g} budget={budget:.3g}")
                us = timer.cupy_graph([make(i) for i in range(c)])
                emit(kind="gemm", shape=f"{n}x{k}", m=m, variant=name, ok=ok, rel_err=f"{err:.2e}",
                     torch_err=f"{budget:.2e}", us=round(us, 2), torch_us=round(torch_us, 2),
                     vs_torch=round(torch_us / us, 2), weight_gbps=round((packed.numel() + absmax.numel()) / us / 1e3, 1))
        del ws, sets
        torch.cuda.empty_cache()

    # Summary: the best of each kind per shape.
    print("\n| kind | shape | m | best variant | us | ratio |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(r["kind"], r["shape"], r.get("m", 0)) for r in rows})
    for kind, shape, m in keys:
        group = [r for r in rows if (r["kind"], r["shape"], r.get("m", 0)) == (kind, shape, m)
                 and r.get("exact", r.get("ok"))]
        if not group:
            continue
        best = min(group, key=lambda r: r["us"])
        ratio = f"{best['vs_copy']} of copy" if kind == "dequant" else f"{best['vs_torch']}x torch bf16"
        print(f"| {kind} | {shape} | {m or ''} | {best['variant']} | {best['us']} | {ratio} |")
    print(f"variants: {len(rows)} timed in {time.monotonic() - started:.0f} s; failures: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
