"""``qlora-rs convert``: a float checkpoint (safetensors or GGUF) to a 4-bit one, or ``--plan`` to
see what would happen."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Optional, TextIO

from .output import PROG, ProgressBar, _bytes, _count, _file_list, _natural_key, _seconds, _shape, _table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a safetensors checkpoint or a GGUF model to bitsandbytes 4-bit (NF4/FP4)",
        description=(
            "Convert a float safetensors checkpoint (a .safetensors file, or a model directory with "
            "model.safetensors or a sharded model.safetensors.index.json) or a GGUF model (llama, qwen2, "
            "qwen3; F32/F16/BF16, Q4_0..Q8_0 and K-quant tensors) to a bitsandbytes 4-bit checkpoint that "
            "transformers + bitsandbytes load unchanged. A GGUF is decoded exactly as transformers' GGUF "
            "loader does; its config and tokenizer need pip install 'qlora-rs[gguf]'. Streams: memory stays "
            "at about the largest tensor. The output appears atomically (written to a hidden temporary, "
            "renamed at the end)."
        ),
    )
    p.add_argument("src", help="a .safetensors file, a model directory, or a .gguf file")
    p.add_argument("-o", "--output", dest="dst", help="output directory (default: <src>-<quant type> next to SRC), "
                   "or a .safetensors file for a single-file source")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default: nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="elements per absmax block: 32..4096 (default: 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="store block scales as float32 instead of double-quantizing them to 8 bits")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="bnb_4bit_compute_dtype written to config.json (default: bfloat16)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="quantize exactly the rank-2 float tensors whose full name matches a glob "
                        "(* ? [..]; repeatable), instead of the default linear weights")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep tensors whose full name matches a glob, e.g. '*.mlp.down_proj.*' (repeatable)")
    p.add_argument("--threads", type=int, help="worker threads (default: QLORA_RS_NUM_THREADS or all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing output; without it an existing output is "
                   "refused")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, sizes before/after) and exit")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="quantize weights holding NaN/inf (NaN -> 0, inf saturates) instead of failing")
    p.add_argument("--no-sync", dest="sync", action="store_false",
                   help="skip the fsync before the final rename; without it the output is on disk before it appears")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="GGUF sources: the float type tensors decode to, as transformers' dtype= (default: bfloat16)")
    p.add_argument("--dequantize-only", action="store_true",
                   help="GGUF sources: write the float model (no 4-bit), e.g. for 16-bit fine-tuning")
    p.add_argument("--calibrate", metavar="DATA",
                   help="choose the 4-bit codes of the decoder blocks' linear layers to minimise their output error "
                        "on DATA (JSONL in a training format, or plain text) instead of rounding to nearest: same "
                        "format and size; runs the model (needs transformers)")
    p.add_argument("--calib-samples", type=int, default=32, metavar="N",
                   help="calibration sequences taken from DATA (default: 32)")
    p.add_argument("--calib-seq", type=int, default=512, metavar="N",
                   help="tokens per calibration sequence (default: 512)")
    p.set_defaults(func=run)


def _convert_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
        compute_dtype=args.compute_dtype, include=args.include, exclude=args.exclude, threads=args.threads,
        force=args.force, allow_nonfinite=args.allow_nonfinite, sync=args.sync, dtype=args.dtype,
        dequantize_only=args.dequantize_only,
    )


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from ..io.convert import convert_checkpoint, plan_conversion

    out = out if out is not None else sys.stdout

    if args.dry_run:
        plan = plan_conversion(args.src, args.dst, **_convert_kwargs(args))
        _print_plan(plan, args, out)
        return 0
    if getattr(args, "calibrate", None) is not None:
        return _run_calibrated_convert(args, out)
    bar = ProgressBar("converting")
    try:
        summary = convert_checkpoint(args.src, args.dst, progress=bar, **_convert_kwargs(args))
    except KeyboardInterrupt:
        bar.close()
        print(f"{PROG} convert: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    _print_summary(summary, args, out)
    return 0


def _run_calibrated_convert(args: argparse.Namespace, out: TextIO) -> int:
    from ..io.calibrate import convert_calibrated
    from ..errors import InvalidArgumentError

    kwargs = _convert_kwargs(args)
    if kwargs.pop("dequantize_only"):
        raise InvalidArgumentError("--calibrate quantizes; it does not combine with --dequantize-only")
    tty = sys.stderr.isatty()
    start = time.monotonic()

    def blocks(done: int, total: int, message: str) -> None:
        if tty:
            sys.stderr.write(f"\rcalibrating {message} ({_seconds(time.monotonic() - start)})\x1b[K")
            sys.stderr.flush()

    bar = ProgressBar("writing")
    try:
        summary = convert_calibrated(args.src, args.dst, args.calibrate, samples=args.calib_samples,
                                     seq_len=args.calib_seq, progress=bar, calibration_progress=blocks, **kwargs)
    except KeyboardInterrupt:
        print(f"\n{PROG} convert: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
        if tty:
            sys.stderr.write("\r\x1b[K")
    _print_summary(summary, args, out)
    for line in _calibration_lines(summary.calibration or {}):
        print(line, file=out)
    return 0


def _calibration_lines(record: dict) -> list[str]:
    """What a calibration record (config.json's qlora_rs_calibration) says, for people."""
    tensors = record.get("tensors") or {}
    ratios = sorted(float(t["error_ratio"]) for t in tensors.values() if isinstance(t, dict) and "error_ratio" in t)
    lines = [f"calibrated {len(tensors)} weights on {record.get('sequences')} x {record.get('seq_len')} tokens of "
             f"{record.get('data') or 'given tokens'} in {_seconds(float(record.get('seconds') or 0))}"]
    if ratios:
        median = ratios[len(ratios) // 2]
        lines.append(f"out. error {median:.2f}x round-to-nearest's (median over weights; "
                     f"{ratios[0]:.2f}x..{ratios[-1]:.2f}x)")
    rtn = record.get("round_to_nearest") or {}
    if rtn:
        lines.append(f"rounded    {len(rtn)} 4-bit weights to nearest: {_file_list(sorted(rtn), 3)}")
    return lines


def _quant_label(quant_type: str, blocksize: int, double_quant: bool) -> str:
    return f"{quant_type}, block {blocksize}" + (", double quant" if double_quant else "")


def _size_change(before: float, after: float) -> str:
    if not before or not after:
        return ""
    return f" ({before / after:.1f}x smaller)" if after <= before else f" ({after / before:.1f}x larger)"


def _print_plan(plan: Any, args: argparse.Namespace, out: TextIO) -> None:
    tensors = sorted(plan.tensors, key=lambda t: _natural_key(t.name))
    multi = len({t.shard for t in tensors}) > 1
    gguf = plan.architecture is not None
    headers = ["tensor", "shape", "stored" if gguf else "dtype", "action", "why", "before", "after"]
    headers += ["shard"] if multi else []
    rows = []
    for t in tensors:
        action = "quantize" if t.quantize else (f"-> {t.dtype}" if gguf else "keep")
        row = [t.name, _shape(t.shape), t.stored if gguf else t.dtype, action, t.reason,
               _bytes(t.bytes_in), _bytes(t.bytes_out)]
        rows.append(row + ([t.shard] if multi else []))
    _table(headers, rows, [False, False, False, False, False, True, True] + [False] * multi, out)
    q = [t for t in tensors if t.quantize]
    before, after = sum(t.bytes_in for t in tensors), sum(t.bytes_out for t in tensors)
    qp = sum(t.numel for t in q)
    print(file=out)
    print(f"plan       {len(q)} tensors quantized ({_quant_label(args.quant_type, args.blocksize, args.double_quant)}), "
          f"{len(tensors) - len(q)} kept", file=out)
    print(f"params     {_count(qp)} quantized, {_count(sum(t.numel for t in tensors) - qp)} kept", file=out)
    print(f"size       {_bytes(before)} -> {_bytes(after)}{_size_change(before, after)} (estimate)", file=out)
    if gguf:
        print(f"source     GGUF, architecture {plan.architecture}; tensors decoded as transformers loads them", file=out)
        if plan.dropped:
            print(f"drops      {_file_list(plan.dropped)} (transformers does not load them)", file=out)
    where = plan.dst + (" (exists: pass --force to replace it)" if plan.dst_exists else "")
    print(f"output     {where}", file=out)
    if plan.copy_files:
        print(f"copies     {_file_list(plan.copy_files)}", file=out)
    if plan.skipped_files:
        print(f"leaves out {_file_list(plan.skipped_files)} (weights in other formats)", file=out)
    if plan.skip_modules is not None:
        print(f"note       config.json lists {len(plan.skip_modules)} modules in llm_int8_skip_modules", file=out)


def _print_summary(s: Any, args: argparse.Namespace, out: TextIO) -> None:
    params = s.params_quantized + s.params_kept
    print(f"converted  {args.src} -> {s.dst}", file=out)
    shards = f", {s.shards} shards" if s.shards > 1 else ""
    if getattr(args, "dequantize_only", False):
        print(f"tensors    {s.tensors_kept} decoded to {args.dtype or 'bfloat16'}{shards}", file=out)
    else:
        label = _quant_label(args.quant_type, args.blocksize, args.double_quant)
        print(f"tensors    {s.tensors_quantized} quantized ({label}), {s.tensors_kept} kept{shards}", file=out)
    print(f"params     {_count(s.params_quantized)} quantized, {_count(s.params_kept)} kept", file=out)
    print(f"size       {_bytes(s.bytes_in)} -> {_bytes(s.bytes_out)}{_size_change(s.bytes_in, s.bytes_out)}", file=out)
    overall = 8 * s.bytes_out / params if params else math.nan
    if s.params_quantized:
        print(f"bits/param {s.bits_per_param:.3f} in quantized weights, {overall:.2f} overall", file=out)
    else:
        print(f"bits/param {overall:.2f} overall", file=out)
    print(f"time       {s.seconds:.2f} s, {s.gb_per_s:.2f} GB/s", file=out)
    if s.files_copied:
        print(f"copied     {_file_list(s.files_copied)}", file=out)
    if s.files_skipped:
        print(f"left out   {_file_list(s.files_skipped)} (weights in other formats)", file=out)
