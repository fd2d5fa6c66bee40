"""Benchmark of `qlora-rs convert` against the transformers + bitsandbytes path.

Builds a ~300M-parameter Llama-shaped bf16 checkpoint from a ``LlamaConfig`` (tensor names and
shapes from a meta-device model; values written chunk by chunk, never all in memory), then in
the same run:

* ``qlora-rs convert SRC -o DST`` (the console script, in a subprocess);
* the same conversion through the extension module alone (``_lib.convert_checkpoint`` loaded
  without the ``qlora_rs`` package, so without importing torch): what the command costs once
  the package imports torch lazily;
* transformers + bitsandbytes: ``AutoModelForCausalLM.from_pretrained(SRC,
  quantization_config=BitsAndBytesConfig(4-bit NF4, double quant, bf16 compute),
  device_map="cpu")`` then ``save_pretrained`` (in a subprocess);
* a memcpy of the checkpoint's bytes (numpy, one thread) as the bandwidth anchor.

Prints wall times (end to end, and the conversion alone without interpreter start-up and
imports), peak RSS of each subprocess (from wait4), GB/s, and the ratios. Timings are never
asserted. Both read the source from the page cache (it is read once before each run) and neither
fsyncs its output (``--no-sync``; pass ``--sync`` to include qlora-rs' fsync).

    python benches/convert_bench.py [--work DIR] [--layers 20] [--hidden 1024] [--repeat 1] [--sync]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

GB = 1e9

CORE_CHILD = textwrap.dedent(
    """
    import importlib.machinery, importlib.util, json, sys, time
    so, src, dst, sync = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    loader = importlib.machinery.ExtensionFileLoader("_lib", so)
    lib = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_lib", so, loader=loader))
    loader.exec_module(lib)
    t = time.perf_counter()
    s = lib.convert_checkpoint(src, dst, "nf4", 64, True, "bfloat16", [], [], None, False, False, sync, None)
    print(json.dumps({"work_s": time.perf_counter() - t, "seconds": s["seconds"]}))
    """
)

BNB_CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    t1 = time.perf_counter()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, device_map="cpu")
    model.save_pretrained(sys.argv[2])
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1}))
    """
)


def llama_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> tuple[int, int]:
    """Writes config.json and a bf16 model.safetensors; returns (parameters, bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(directory)

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    chunk = 1 << 22
    f32 = (rng.standard_normal(chunk).astype(np.float32) * 0.02).view(np.uint32)
    bf16 = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype(np.uint16)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        k = 0
        for name in sorted(shapes):
            left = int(np.prod(shapes[name]))
            while left:
                m = min(left, chunk)
                f.write((np.roll(bf16, k)[:m]).tobytes())
                left -= m
                k += 1
    params = sum(int(np.prod(s)) for s in shapes.values())
    return params, 8 + len(h) + offset


def warm(path: Path) -> None:
    """Reads a file so that both contenders start from the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# Linux carries the parent's peak RSS into a child's ru_maxrss across fork + exec, and this
# process has imported torch; a small launcher process in between keeps the figures clean.
LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    t = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    scale = 1 if sys.platform == "darwin" else 1024
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - t,
                      "peak": ru.ru_maxrss * scale, "stderr": err[-4000:]}), file=sys.stderr)
    """
)


def run_child(argv: list[str]) -> tuple[float, int, str]:
    """Runs a subprocess; returns (wall seconds, peak RSS bytes, stdout)."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER] + argv, capture_output=True, text=True)
    m = json.loads(r.stderr.strip().splitlines()[-1])
    if m["rc"] != 0:
        raise SystemExit(f"{argv[0]} failed ({m['rc']}):\n{m['stderr']}")
    return m["wall"], m["peak"], r.stdout


def memcpy_gbps(nbytes: int, repeat: int = 3) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return nbytes / best / GB


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each contender (best is reported)")
    ap.add_argument("--sync", action="store_true", help="let qlora-rs fsync its output (as it does by default)")
    ap.add_argument("--skip-bnb", action="store_true", help="only time qlora-rs")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        src = work / "llama"
        t = time.perf_counter()
        params, nbytes = llama_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab)
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {nbytes / GB:.2f} GB bf16 "
              f"(written in {time.perf_counter() - t:.1f} s) at {src}")

        exe = Path(sys.executable).with_name("qlora-rs")
        cli = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                              "import sys; from qlora_rs.cli import main; sys.exit(main())"]
        ours = []
        for i in range(args.repeat):
            dst = work / f"ours-{i}"
            warm(src / "model.safetensors")
            argv = cli + ["convert", str(src), "-o", str(dst)] + ([] if args.sync else ["--no-sync"])
            wall, peak, out = run_child(argv)
            work_s = float(next(line for line in out.splitlines() if line.startswith("time")).split()[1])
            ours.append((wall, work_s, peak))
            shutil.rmtree(dst)
        wall, work_s, peak = min(ours)
        print(f"qlora-rs convert (CLI):     {wall:7.2f} s end to end, {work_s:6.2f} s converting, "
              f"peak RSS {peak / 2**20:6.0f} MiB, {nbytes / work_s / GB:.2f} GB/s")

        import qlora_rs

        so = next(Path(qlora_rs.__file__).parent.glob("_lib*.so"), None)
        core = []
        for i in range(args.repeat if so else 0):
            dst = work / f"core-{i}"
            warm(src / "model.safetensors")
            cwall, cpeak, out = run_child([sys.executable, "-c", CORE_CHILD, str(so), str(src), str(dst),
                                           "1" if args.sync else "0"])
            core.append((cwall, json.loads(out.strip().splitlines()[-1])["work_s"], cpeak))
            shutil.rmtree(dst)
        if core:
            cwall, cwork, cpeak = min(core)
            print(f"qlora-rs core (no torch):   {cwall:7.2f} s end to end, {cwork:6.2f} s converting, "
                  f"peak RSS {cpeak / 2**20:6.0f} MiB, {nbytes / cwork / GB:.2f} GB/s")

        mc = memcpy_gbps(nbytes)
        print(f"memcpy (numpy, 1 thread): {mc:.2f} GB/s; qlora-rs converts at {nbytes / work_s / GB / mc:.2f}x memcpy speed")

        if args.skip_bnb:
            return
        theirs = []
        for i in range(args.repeat):
            dst = work / f"bnb-{i}"
            warm(src / "model.safetensors")
            bwall, bpeak, out = run_child([sys.executable, "-c", BNB_CHILD, str(src), str(dst)])
            theirs.append((bwall, json.loads(out.strip().splitlines()[-1])["work_s"], bpeak))
            shutil.rmtree(dst)
        bwall, bwork, bpeak = min(theirs)
        print(f"transformers + bnb:         {bwall:7.2f} s end to end, {bwork:6.2f} s load+quantize+save, "
              f"peak RSS {bpeak / 2**20:6.0f} MiB, {nbytes / bwork / GB:.2f} GB/s")
        print()
        print("                        speed-up (target >= 20x)       peak RSS ratio (target <= 0.25)")
        print(f"CLI, end to end         {bwall / wall:6.1f}x                          {peak / bpeak:.3f}")
        if core:
            print(f"core, end to end        {bwall / cwall:6.1f}x                          {cpeak / bpeak:.3f}")
        print(f"conversion alone        {bwork / work_s:6.1f}x  (without interpreter start-up and imports)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
