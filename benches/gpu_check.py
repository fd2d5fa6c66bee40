"""The GPU check of qlora-rs: correctness and speed of the CUDA kernels, in a few minutes.

Builds nothing. It needs ``qlora_rs`` (built with its kernels) and ``bitsandbytes`` importable; on
the GPU machine ``benches/run_gpu_check.sh`` installs both from the carried wheels in ``.whl/``
(made by ``../shared/tools/device-prep.sh``) and then runs this script.

    python3 benches/gpu_check.py [--out DIR] [--budget-s 240] [--only NAME ...] [--quick]

Writes ``gpu_check.json`` (every number) and ``gpu_check.md`` (the tables) under ``--out``
(default ``$OUT``, else ``bench-out/``), rewritten after every check so a run cut short still
leaves its results; prints the markdown last.

Structure: a list of check functions, each run in its own try/except with a share of the global
time budget, so one failing check does not stop the others. Other features add their GPU checks
without editing this file: every ``benches/gpu_check_*.py`` that defines ``CHECKS = [fn, ...]`` is
loaded (``fn(ctx)`` gets the :class:`Ctx` below; it adds rows with ``ctx.row(...)``, notes with
``ctx.note(...)`` and can time with ``ctx.time_calls(...)``). Expected there: the paged-optimizer
check (``gpu_check_paging.py``) and the FSDP2 world-size-1 NCCL step (``gpu_check_fsdp2.py``).

Timing: CUDA graphs of many calls replayed between CUDA events (so Python and launch overhead
drop out; eager per-call times are reported beside them where they matter), medians of several
replays, and inputs rotated over enough copies to exceed the L2 cache. Ratios compare against
anchors measured in the same run (a device-to-device copy, torch bf16 matmul, bitsandbytes).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # weight [out, in]
SPEED_MS = [1, 4, 16]
TARGETS = {
    "dequant_vs_copy": 0.90,  # dequantize bandwidth >= 90% of a device-to-device copy
    "m1_vs_torch": 2.5,  # M=1 fused GEMM >= 2.5x torch bf16 matmul
    "m16_vs_torch": 1.0,  # M=16 >= 1.0x torch bf16
    "vs_bnb": 1.0,  # faster than bitsandbytes on every row
}


class CheckTimeout(Exception):
    pass


class Ctx:
    """What a check function gets: rows/notes sinks, the time left, timing helpers."""

    def __init__(self, budget_s: float, quick: bool, out_dir: Path):
        self.deadline = time.monotonic() + budget_s
        self.quick = quick
        self.out_dir = out_dir
        self.results: dict[str, dict] = {}
        self.current: Optional[str] = None

    # -- results
    def row(self, **fields: Any) -> None:
        self.results[self.current]["rows"].append(fields)

    def note(self, text: str) -> None:
        self.results[self.current]["notes"].append(text)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # -- timing
    def time_calls(self, fns: list[Callable[[], Any]], calls: int = 40, reps: int = 7, graph: bool = True,
                   keep: bool = False) -> tuple[float, str]:
        """Median microseconds per call of ``fns`` (cycled: pass one closure per input copy).
        ``graph``: capture ``calls`` calls in a CUDA graph and time replays (no launch overhead);
        falls back to eager timing if capture fails. ``keep``: hold every call's result, so each
        call writes fresh memory (large outputs would otherwise be rewritten in the L2 cache).
        Returns (microseconds, "graph"|"eager")."""
        if self.quick:
            calls, reps = max(4, calls // 4), 3
        for f in fns:
            f()
        torch.cuda.synchronize()
        if graph:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for f in fns:
                        f()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                held = []
                with torch.cuda.graph(g):
                    for i in range(calls):
                        r = fns[i % len(fns)]()
                        if keep:
                            held.append(r)
                g.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(reps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    g.replay()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1000.0 / calls)
                del g, held
                return statistics.median(times), "graph"
            except Exception as e:  # noqa: BLE001 - report and fall back
                torch.cuda.synchronize()
                self.note(f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); eager timing used")
        return self.time_eager(fns, calls, reps, keep), "eager"

    def time_eager(self, fns: list[Callable[[], Any]], calls: int = 40, reps: int = 7, keep: bool = False) -> float:
        """Median microseconds per call launched eagerly from Python (what a user sees)."""
        if self.quick:
            calls, reps = max(4, calls // 4), 3
        for f in fns:
            f()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            held = []
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(calls):
                r = fns[i % len(fns)]()
                if keep:
                    held.append(r)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000.0 / calls)
            del held
        return statistics.median(times)


def copies_for(nbytes: int, cap: int = 32) -> int:
    """Input copies to rotate so the working set is about 3x the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    return max(1, min(cap, math.ceil(3 * l2 / max(nbytes, 1))))


# ---------------------------------------------------------------------------------------------
# Helpers on top of qlora_rs (imported lazily so a broken install is reported, not fatal).


def qr():
    import qlora_rs

    return qlora_rs


def cuda_ops():
    from qlora_rs.core import cuda_ops as m

    return m


def quantize_gpu(w: torch.Tensor, quant_type="nf4", blocksize=64, double_quant=True):
    """(packed, state) on CPU and the op argument tuple on the GPU."""
    packed, state = qr().quantize(w.cpu(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    args = (
        packed.cuda(),
        state.absmax.cuda(),
        state.nested_absmax.cuda() if state.nested else None,
        state.nested_code.cuda() if state.nested else None,
        float(state.offset) if state.nested else 0.0,
        quant_type,
        blocksize,
        [int(s) for s in state.shape],
    )
    return packed, state, args


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Checks.


def check_environment(ctx: Ctx) -> None:
    p = torch.cuda.get_device_properties(0)
    ctx.row(item="gpu", value=f"{p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    ctx.row(item="torch", value=f"{torch.__version__} (CUDA {torch.version.cuda})")
    ctx.row(item="python", value=platform.python_version())
    info = qr().build_info()
    ctx.row(item="qlora_rs", value=json.dumps(info))
    from qlora_rs import _lib

    ctx.row(item="fatbin", value=",".join(_lib.cuda_fatbin_targets()))
    try:
        import bitsandbytes as bnb

        ctx.row(item="bitsandbytes", value=bnb.__version__)
    except Exception as e:  # noqa: BLE001
        ctx.row(item="bitsandbytes", value=f"not importable: {e}")
    if not info["cuda_kernels"]:
        raise RuntimeError("qlora_rs was built without CUDA kernels: every kernel check will fail")
    cuda_ops().check_device(0)


def check_dequant_exact(ctx: Ctx) -> None:
    """Bit-exact with the Rust core's CPU decode: every type, dtype, double quant or not, odd sizes,
    an unaligned packed buffer (element-wise path). For information: our decode of tensors that
    bitsandbytes quantized on the GPU, against bitsandbytes' own CUDA dequantize."""
    co = cuda_ops()
    shapes = [((4096, 4096), 64), ((1000, 333), 128), ((7,), 32), ((3, 4096), 4096), ((257, 1024), 32), ((1, 63), 64)]
    g = torch.Generator().manual_seed(0)
    for quant_type in ("nf4", "fp4", "int4"):
        for dq in (True, False):
            for shape, bs in shapes:
                w = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
                packed, state, args = quantize_gpu(w, quant_type, bs, dq)
                mismatches = {}
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    want = qr().dequantize(packed, state, dtype)
                    got = co.dequantize_4bit_cuda(*args, dtype).cpu()
                    mismatches[str(dtype).removeprefix("torch.")] = int((bits(got) != bits(want)).sum())
                ctx.row(reference="rust core", quant_type=quant_type, double_quant=dq, shape=str(list(shape)), blocksize=bs,
                        dtype="float32,float16,bfloat16", bit_exact=not any(mismatches.values()),
                        mismatches=json.dumps(mismatches))
    # Unaligned packed (odd address) and a bf16 storage view.
    w = torch.randn(33, 70, generator=g).to(torch.bfloat16)
    packed, state, args = quantize_gpu(w, "nf4", 64, True)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:].copy_(args[0].reshape(-1))
    got = co.dequantize_4bit_cuda(buf[1:], *args[1:], torch.bfloat16).cpu()
    ctx.row(reference="rust core", quant_type="nf4", double_quant=True, shape="[33, 70] unaligned", blocksize=64,
            dtype="bfloat16",
            bit_exact=torch.equal(bits(got), bits(qr().dequantize(packed, state, torch.bfloat16))), mismatches=-1)
    # bitsandbytes' own quantization decoded by our kernel (format compatibility on the GPU).
    try:
        import bitsandbytes.functional as F

        wc = torch.randn(512, 768, generator=g).to(torch.bfloat16).cuda()
        for quant_type in ("nf4", "fp4"):
            q, st = F.quantize_4bit(wc, blocksize=64, compress_statistics=True, quant_type=quant_type)
            theirs = F.dequantize_4bit(q, st)
            s2 = st.state2
            ours = co.dequantize_4bit_cuda(q, st.absmax, s2.absmax, s2.code, float(st.offset), quant_type, 64,
                                           list(wc.shape), torch.bfloat16)
            ctx.row(reference="bitsandbytes (info)", quant_type=quant_type, double_quant=True, shape="[512, 768]",
                    blocksize=64,
                    dtype="bfloat16", bit_exact=torch.equal(bits(ours), bits(theirs)),
                    mismatches=int((bits(ours) != bits(theirs)).sum()))
    except ImportError:
        ctx.note("bitsandbytes not importable: no cross-check against its dequantize")
    bad = [r for r in ctx.results[ctx.current]["rows"] if not r["bit_exact"] and r["reference"] == "rust core"]
    if bad:
        raise AssertionError(f"{len(bad)} dequantize cases are not bit-exact (see rows)")


def check_gemm_accuracy(ctx: Ctx) -> None:
    """Every GEMM path against a float64 product of the same dequantized weight, within twice the
    error of torch's own bf16/fp16 matmul of the same inputs."""
    co = cuda_ops()
    g = torch.Generator().manual_seed(1)
    cases = [((4096, 4096), 64), ((33, 96), 64), ((1000, 4128), 128), ((17, 64), 32), ((14336, 4096), 64)]
    failures = 0
    for (n, k), bs in cases:
        for dtype in (torch.bfloat16, torch.float16):
            w = torch.randn(n, k, generator=g).to(dtype)
            _, _, args = quantize_gpu(w, "nf4", bs, True)
            wd = co.dequantize_4bit_cuda(*args, dtype)
            for kernel, warps in (("gemv", None), ("gemv", 8), ("gemv", 16), ("gemv", 32), ("mma", None), ("mma", 1),
                                  ("mma", 16), ("simt", None), ("auto", None), ("dequant", None)):
                worst, bad = None, []
                ms = {"simt": [1, 3, 4], "gemv": [1, 2, 5, 8], "mma": [1, 2, 5, 8, 9, 16]}.get(kernel, [1, 5, 16, 17, 64])
                for m in ms:
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    ref = x.double() @ wd.double().t()
                    budget = rel_err(x @ wd.t(), ref)
                    got = co.gemm_4bit_cuda(x, *args, kernel=kernel, warps=warps)
                    err = rel_err(got, ref)
                    if not (err <= 2 * budget + 1e-6 and got.shape == (m, n)):
                        bad.append(m)
                    if worst is None or err / budget > worst[0] / worst[1]:
                        worst = (err, budget, m)
                failures += len(bad)
                ctx.row(shape=f"{n}x{k}", blocksize=bs, dtype=str(dtype).removeprefix("torch."),
                        kernel=kernel + (f"/{warps}w" if warps else ""), m=",".join(map(str, ms)),
                        worst_rel_err=f"{worst[0]:.2e} (m={worst[2]})", torch_rel_err=f"{worst[1]:.2e}",
                        ok=not bad, failing_m=",".join(map(str, bad)))
    if failures:
        raise AssertionError(f"{failures} GEMM cases beyond tolerance (see rows)")


def check_streams_and_graphs(ctx: Ctx) -> None:
    """Launches follow PyTorch's current stream: side streams in parallel, CUDA graph capture,
    and the torch ops dispatching to the kernels."""
    co = cuda_ops()
    w = torch.randn(2048, 4096).to(torch.bfloat16)
    packed, state, args = quantize_gpu(w, "nf4", 64, True)
    want = bits(qr().dequantize(packed, state, torch.bfloat16))
    streams = [torch.cuda.Stream() for _ in range(4)]
    outs = []
    for s in streams:
        with torch.cuda.stream(s):
            outs += [co.dequantize_4bit_cuda(*args, torch.bfloat16) for _ in range(8)]
    torch.cuda.synchronize()
    ctx.row(case="4 side streams x 8 dequantize", ok=all(torch.equal(bits(o.cpu()), want) for o in outs))
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    eager = co.gemm_4bit_cuda(x, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        co.gemm_4bit_cuda(x, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = co.gemm_4bit_cuda(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ctx.row(case="gemm in a CUDA graph, replayed on new input", ok=torch.equal(captured, co.gemm_4bit_cuda(x, *args)))
    ctx.row(case="graph vs eager differ on different input", ok=not torch.equal(captured, eager))
    import qlora_rs.core.ops  # noqa: F401

    co.register()
    y = torch.ops.qlora_rs.gemm_4bit(x, *args)
    d = torch.ops.qlora_rs.dequantize_4bit(*args, torch.bfloat16)
    ctx.row(case="torch.ops.qlora_rs.* dispatch to the kernels",
            ok=torch.equal(y, co.gemm_4bit_cuda(x, *args)) and torch.equal(bits(d.cpu()), want))
    if torch.cuda.device_count() > 1:
        args1 = tuple(a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in args)
        d1 = co.dequantize_4bit_cuda(*args1, torch.bfloat16)
        ctx.row(case="second GPU", ok=d1.device.index == 1 and torch.equal(bits(d1.cpu()), want))
    if not all(r["ok"] for r in ctx.results[ctx.current]["rows"]):
        raise AssertionError("a stream/graph/dispatch case failed (see rows)")


def check_speed_dequant(ctx: Ctx) -> None:
    """Dequantize bandwidth (bytes read + written) vs a device-to-device copy of the same bytes and
    vs bitsandbytes' dequantize_4bit."""
    co = cuda_ops()
    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
        ctx.note("bitsandbytes not importable: no bitsandbytes column")
    # The ceiling: one large copy (1 GiB read + 1 GiB written), as METHOD.md measures bandwidth.
    big = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    peak_us, _ = ctx.time_calls([lambda: big[1].copy_(big[0])], calls=5, reps=5)
    peak_gbps = 2 * (1 << 30) / peak_us / 1e3
    del big
    ctx.note(f"large device copy (1 GiB): {peak_gbps:.0f} GB/s read + written; column vs_peak_copy")
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        _, _, args = quantize_gpu(w, "nf4", 64, True)
        in_bytes = args[0].numel() + args[1].numel() + args[2].numel() * 4 + 1024
        out_bytes = n * k * 2
        moved = in_bytes + out_bytes
        c = copies_for(in_bytes)
        sets = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(c)]
        ours, mode = ctx.time_calls([lambda a=a: co.dequantize_4bit_cuda(*a, torch.bfloat16) for a in sets], keep=True)
        # The copy moves the same bytes (read + write = moved), also rotated past the L2 cache.
        pairs = [(torch.empty(moved // 2, dtype=torch.uint8, device="cuda"),
                  torch.empty(moved // 2, dtype=torch.uint8, device="cuda")) for _ in range(copies_for(moved))]
        copy, _ = ctx.time_calls([lambda p=p: p[1].copy_(p[0]) for p in pairs])
        row = dict(shape=f"{n}x{k}", ours_us=round(ours, 2), ours_gbps=round(moved / ours / 1e3, 1),
                   copy_gbps=round(moved / copy / 1e3, 1), vs_copy=round(copy / ours, 3),
                   vs_peak_copy=round(moved / ours / 1e3 / peak_gbps, 3), timing=mode)
        if F is not None:
            qs = [F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for _ in range(c)]
            theirs, _ = ctx.time_calls([lambda q=q: F.dequantize_4bit(q[0], q[1]) for q in qs], keep=True)
            row.update(bnb_us=round(theirs, 2), vs_bnb=round(theirs / ours, 2))
        row["target_met"] = row["vs_copy"] >= TARGETS["dequant_vs_copy"] and row.get("vs_bnb", 2) >= TARGETS["vs_bnb"]
        ctx.row(**row)
        del sets, pairs
        torch.cuda.empty_cache()


def check_speed_gemm(ctx: Ctx) -> None:
    """Small-M 4-bit GEMM (auto kernel choice) vs torch bf16 matmul and vs bitsandbytes'
    matmul_4bit (its gemv kernel at M=1), weights rotated past the L2 cache."""
    co = cuda_ops()
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        bnb = None
        ctx.note("bitsandbytes not importable: no bitsandbytes column")
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        _, _, args = quantize_gpu(w, "nf4", 64, True)
        c4 = copies_for(args[0].numel())
        sets = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(c4)]
        c16 = copies_for(n * k * 2)
        ws = [w.clone() for _ in range(c16)]
        qs = [F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for _ in range(c4)] if bnb else []
        for m in SPEED_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ours, mode = ctx.time_calls([lambda a=a: co.gemm_4bit_cuda(x, *a) for a in sets])
            ref, _ = ctx.time_calls([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])
            eager = ctx.time_eager([lambda a=a: co.gemm_4bit_cuda(x, *a) for a in sets])
            row = dict(shape=f"{n}x{k}", m=m, kernel=co.choose_gemm_kernel(m, k, x.dtype), ours_us=round(ours, 2),
                       torch_us=round(ref, 2), vs_torch=round(ref / ours, 2), ours_eager_us=round(eager, 1), timing=mode)
            if bnb:
                theirs, _ = ctx.time_calls([lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1]) for q in qs])
                row.update(bnb_us=round(theirs, 2), vs_bnb=round(theirs / ours, 2))
            want = TARGETS["m1_vs_torch"] if m == 1 else TARGETS["m16_vs_torch"] if m == 16 else 0.0
            row["target_met"] = row["vs_torch"] >= want and row.get("vs_bnb", 2) >= TARGETS["vs_bnb"]
            ctx.row(**row)
        del sets, ws, qs
        torch.cuda.empty_cache()


def check_crossover(ctx: Ctx) -> None:
    """Fused kernels (gemv, also with 8, 16 and 32 warps at M = 1 and 8; mma with 4, 8 and 16 warps;
    simt) vs dequantize + torch.matmul over M:
    the largest M where fused wins is the value for cuda_ops.FUSED_GEMM_MAX_M; the M up to which
    gemv beats mma, for GEMV_MAX_M; the M up to which simt beats both, for SIMT_GEMM_MAX_M."""
    co = cuda_ops()
    best_fused_max, gemv_max, simt_max = {}, {}, {}
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        _, _, args = quantize_gpu(w, "nf4", 64, True)
        c = copies_for(args[0].numel())
        sets = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(c)]
        fused_max, gemv_upto, simt_upto = 0, 0, 0
        fused_lost, gemv_lost, simt_lost = False, False, False
        for m in [1, 2, 4, 8, 12, 16, 32, 64]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {}
            t["dequant"], _ = ctx.time_calls([lambda a=a: co.gemm_4bit_cuda(x, *a, kernel="dequant") for a in sets], calls=20)
            if m <= 8:
                t["gemv"], _ = ctx.time_calls([lambda a=a: co.gemm_4bit_cuda(x, *a, kernel="gemv") for a in sets])
            if m in (1, 8):  # each warp count the GEMV chooses from (shown; "gemv" is the automatic choice)
                for warps in (8, 16, 32):
                    t[f"gemv{warps}"], _ = ctx.time_calls(
                        [lambda a=a, wp=warps: co.gemm_4bit_cuda(x, *a, kernel="gemv", warps=wp) for a in sets])
            if m <= 16:
                for warps in (4, 8, 16):
                    t[f"mma{warps}"], _ = ctx.time_calls(
                        [lambda a=a, wp=warps: co.gemm_4bit_cuda(x, *a, kernel="mma", warps=wp) for a in sets])
            if m <= 4:
                t["simt"], _ = ctx.time_calls([lambda a=a: co.gemm_4bit_cuda(x, *a, kernel="simt") for a in sets])
            best = min(t, key=t.get)
            mma_best = min((v for kk, v in t.items() if kk.startswith("mma")), default=math.inf)
            # Each crossover: the last M (in increasing order) before the first where the kernel loses.
            if m <= 16 and not fused_lost:
                if best != "dequant":
                    fused_max = m
                else:
                    fused_lost = True
            if "gemv" in t and not gemv_lost:
                if t["gemv"] < mma_best:
                    gemv_upto = m
                else:
                    gemv_lost = True
            if "simt" in t and not simt_lost:
                if t["simt"] < min(mma_best, t.get("gemv", math.inf)):
                    simt_upto = m
                else:
                    simt_lost = True
            ctx.row(shape=f"{n}x{k}", m=m, **{f"{kk}_us": round(v, 2) for kk, v in t.items()}, best=best)
        best_fused_max[f"{n}x{k}"] = fused_max
        gemv_max[f"{n}x{k}"] = gemv_upto
        simt_max[f"{n}x{k}"] = simt_upto
    ctx.note(f"crossover: fused wins up to M = {best_fused_max} -> set cuda_ops.FUSED_GEMM_MAX_M = "
             f"{min(best_fused_max.values()) if best_fused_max else 0}")
    ctx.note(f"gemv beats mma up to M = {gemv_max} -> set cuda_ops.GEMV_MAX_M = "
             f"{min(gemv_max.values()) if gemv_max else 0}")
    ctx.note(f"simt beats both up to M = {simt_max} -> set cuda_ops.SIMT_GEMM_MAX_M = "
             f"{min(simt_max.values()) if simt_max else 0}; compare mma4_us/mma8_us/mma16_us for MMA_WARPS")


def check_lora_train_step(ctx: Ctx) -> None:
    """Linear4bit + LoRA forward + backward (4 x 512 tokens, r=16) vs PEFT on bitsandbytes, and a
    16-token decode-size forward."""
    import torch.nn as nn

    q = qr()
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError as e:
        raise RuntimeError(f"needs bitsandbytes and peft: {e}") from e
    for n, k in [(4096, 4096), (14336, 4096)]:
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        ours = q.LoraLinear4bit(q.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16), r=16, alpha=16, dropout=0.0).cuda()
        with torch.no_grad():
            ours.lora_B.weight.normal_()
        bl = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        bl.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        model = nn.Sequential()
        model.add_module("proj", bl.cuda())
        theirs = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]))
        for tokens in (2048, 16):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

            def step(layer):
                y = layer(x)
                y.backward(gy)
                return y

            t_ours = ctx.time_eager([lambda: step(ours)], calls=10, reps=5)
            t_theirs = ctx.time_eager([lambda: step(theirs)], calls=10, reps=5)
            with torch.no_grad():
                f_ours = ctx.time_eager([lambda: ours(x)], calls=20, reps=5)
                f_theirs = ctx.time_eager([lambda: theirs(x)], calls=20, reps=5)
            ctx.row(shape=f"{n}x{k}", tokens=tokens, ours_fwd_bwd_us=round(t_ours, 1), peft_bnb_fwd_bwd_us=round(t_theirs, 1),
                    fwd_bwd_speedup=round(t_theirs / t_ours, 2), ours_fwd_us=round(f_ours, 1),
                    peft_bnb_fwd_us=round(f_theirs, 1), fwd_speedup=round(f_theirs / f_ours, 2))


CHECKS: list[Callable[[Ctx], None]] = [
    check_environment,
    check_dequant_exact,
    check_gemm_accuracy,
    check_streams_and_graphs,
    check_speed_dequant,
    check_speed_gemm,
    check_crossover,
    check_lora_train_step,
]

# Share of the remaining budget each check may use (the rest stays for later checks).
SHARE = {"check_dequant_exact": 0.15, "check_gemm_accuracy": 0.2, "check_crossover": 0.35}

# Plug-in checks other features add; listed in the report even when absent.
PLUGINS = {"gpu_check_paging.py": "paged optimizer (issue 7)", "gpu_check_fsdp2.py": "FSDP2 world-size-1 NCCL step (issue 8)"}


def plugin_checks() -> tuple[list[Callable[[Ctx], None]], list[str]]:
    checks, notes = [], []
    found = {Path(p).name: p for p in sorted(glob.glob(str(HERE / "gpu_check_*.py")))}
    for name, what in PLUGINS.items():
        if name not in found:
            notes.append(f"{what}: benches/{name} not present yet")
    for name, path in found.items():
        try:
            spec = importlib.util.spec_from_file_location(name[:-3], path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            checks += list(getattr(mod, "CHECKS", []))
        except Exception as e:  # noqa: BLE001
            notes.append(f"benches/{name} failed to load: {type(e).__name__}: {e}")
    return checks, notes


# ---------------------------------------------------------------------------------------------
# Report.


def markdown(results: dict[str, dict], header: list[str]) -> str:
    lines = ["# qlora-rs GPU check", ""] + header + [""]
    for name, r in results.items():
        lines.append(f"## {name} — {r['status']} ({r['seconds']:.1f} s)")
        if r.get("doc"):
            lines.append(r["doc"])
        rows = r["rows"]
        if rows:
            cols: list[str] = []
            for row in rows:
                cols += [c for c in row if c not in cols]
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in rows:
                lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
        for n in r["notes"]:
            lines.append(f"- {n}")
        if r.get("error"):
            lines += ["", "```", r["error"].strip()[-1500:], "```"]
        lines.append("")
    return "\n".join(lines)


def write(out_dir: Path, results: dict, header: list[str], meta: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(results, header)
    (out_dir / "gpu_check.json").write_text(json.dumps({"meta": meta, "checks": results}, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(md)
    return md


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-out", help="output directory (default: $OUT)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="time budget for the whole run")
    ap.add_argument("--only", nargs="*", default=None, help="run only checks whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    a = ap.parse_args(argv)
    out_dir = Path(a.out)
    started = time.monotonic()
    ctx = Ctx(a.budget_s, a.quick, out_dir)
    extra, plugin_notes = plugin_checks()
    checks = CHECKS + extra
    if a.only:
        checks = [c for c in checks if any(s in c.__name__ for s in a.only)]
    meta = {"argv": sys.argv, "budget_s": a.budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    header = [f"- {n}" for n in plugin_notes]
    if not torch.cuda.is_available():
        header.append("- no CUDA device: nothing to check")
        print(write(out_dir, {}, header, meta))
        return 2
    can_alarm = hasattr(signal, "SIGALRM")

    def on_alarm(signum, frame):
        raise CheckTimeout("check ran past its time budget")

    if can_alarm:
        signal.signal(signal.SIGALRM, on_alarm)
    failed = 0
    for i, check in enumerate(checks):
        name = check.__name__
        left = ctx.remaining()
        ctx.results[name] = {"status": "skipped", "seconds": 0.0, "rows": [], "notes": [], "doc": (check.__doc__ or "").strip()}
        if left < 5:
            ctx.results[name]["notes"].append("no time left in the budget")
            continue
        share = SHARE.get(name, 1.0 / max(1, len(checks) - i))
        allowed = max(10.0, left * max(share, 1.0 / max(1, len(checks) - i)))
        ctx.current = name
        t0 = time.monotonic()
        if can_alarm:
            signal.alarm(int(math.ceil(min(allowed, left))))
        try:
            check(ctx)
            ctx.results[name]["status"] = "ok"
        except CheckTimeout as e:
            ctx.results[name]["status"] = "timeout"
            ctx.results[name]["error"] = str(e)
            failed += 1
        except Exception:  # noqa: BLE001 - one failing check must not stop the others
            ctx.results[name]["status"] = "FAILED"
            ctx.results[name]["error"] = traceback.format_exc()
            failed += 1
        finally:
            if can_alarm:
                signal.alarm(0)
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: later checks will say so
                ctx.results[name]["notes"].append(f"CUDA state after the check: {e}")
        ctx.results[name]["seconds"] = time.monotonic() - t0
        print(f"[gpu_check] {name}: {ctx.results[name]['status']} in {ctx.results[name]['seconds']:.1f}s", flush=True)
        write(out_dir, ctx.results, header, meta)
    meta["seconds"] = time.monotonic() - started
    header.append(f"- total {meta['seconds']:.0f} s; {failed} check(s) failed")
    print(write(out_dir, ctx.results, header, meta))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
