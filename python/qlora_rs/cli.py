"""The ``qlora-rs`` command line.

Subcommands are plug-ins: ``convert`` and ``inspect`` live here; every other module of this
package named ``cli_<something>.py`` that defines ``add_parser(subparsers)`` is picked up
automatically. ``add_parser`` adds its parser with ``subparsers.add_parser(...)`` and sets
``func=handler`` (``handler(args) -> int``, the exit status) with ``set_defaults``.

User errors (bad input files, bad options, existing outputs) print one line on stderr and exit
with status 1; argument errors exit with 2 (argparse); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import pkgutil
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence, TextIO

PROG = "qlora-rs"


# ----------------------------------------------------------------------------------------------
# Formatting helpers


def _natural_key(name: str) -> list:
    """Sorts ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], out: TextIO) -> None:
    """Prints an aligned table: left-aligned text, right-aligned numbers, a rule under the header."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)


class ProgressBar:
    """A one-line progress bar (bytes/s, ETA) on a terminal; does nothing elsewhere."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, enabled: Optional[bool] = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int, tensors_done: int, tensors_total: int, name: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        elapsed = now - self.start
        frac = done / total if total else 1.0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else math.inf
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        eta_s = _seconds(eta) if math.isfinite(eta) else "?"
        text = (
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {_bytes(done)}/{_bytes(total)} "
            f"{_bytes(rate)}/s ETA {eta_s} ({tensors_done}/{tensors_total} tensors)"
        )
        cols = _terminal_columns(self.stream)
        self.stream.write(text[: cols - 1] if cols else text)
        self.stream.write("\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def _terminal_columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


# ----------------------------------------------------------------------------------------------
# convert


def _add_convert(sub: Any) -> None:
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
    p.set_defaults(func=_run_convert)


def _convert_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
        compute_dtype=args.compute_dtype, include=args.include, exclude=args.exclude, threads=args.threads,
        force=args.force, allow_nonfinite=args.allow_nonfinite, sync=args.sync, dtype=args.dtype,
        dequantize_only=args.dequantize_only,
    )


def _run_convert(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from .convert import convert_checkpoint, plan_conversion

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
    from .calibrate import convert_calibrated
    from .errors import InvalidArgumentError

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


def _file_list(files: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f", ... ({len(files)} files)" if len(files) > limit else "")


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


# ----------------------------------------------------------------------------------------------
# inspect


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the tensors of a checkpoint or GGUF file; with --compare, their fidelity against the source",
        description=(
            "Per-tensor table of a safetensors checkpoint (file or model directory): shape, stored dtype, "
            "quant type, block size, bits per parameter, and totals; of a GGUF file: shape, ggml type, bits "
            "per parameter and the transformers name each tensor loads as. With --compare SRC, decodes every "
            "4-bit weight and reports SQNR (dB), max abs error and cosine similarity against SRC (a "
            "checkpoint, or the GGUF file it was converted from)."
        ),
    )
    p.add_argument("path", help="a .safetensors file, a model directory, or a .gguf file")
    p.add_argument("--compare", metavar="SRC", help="the source checkpoint (or GGUF file) to measure fidelity against")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--summary", action="store_true",
                   help="print the totals only (with --compare: and the five tensors of lowest SQNR), not a row "
                        "per tensor")
    p.set_defaults(func=_run_inspect)


def _fmt_float(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _run_inspect(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    import json

    from .convert import calibration_record, compare_checkpoints, fidelity_totals, inspect_checkpoint, is_gguf

    out = out if out is not None else sys.stdout
    if is_gguf(args.path):
        if args.compare:
            from .errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"{args.path} is a GGUF file: --compare measures a converted checkpoint (PATH) against its "
                "source (SRC, which may be a GGUF file)"
            )
        return _inspect_gguf(args, out)

    records = sorted(inspect_checkpoint(args.path), key=lambda r: _natural_key(r.name))
    calibration = calibration_record(args.path)
    calibrated = (calibration or {}).get("tensors") or {}
    fidelity = {}
    if args.compare:
        bar = ProgressBar("comparing")
        try:
            rows = compare_checkpoints(args.path, args.compare, progress=bar)
        finally:
            bar.close()
        fidelity = {r.name: r for r in rows}
    if args.json:
        data = []
        for r in records:
            d = {**r.__dict__, "shape": list(r.shape), "bits_per_param": r.bits_per_param}
            f = fidelity.get(r.name)
            if f is not None:
                d.update(status=f.status, sqnr_db=f.sqnr_db, max_abs=f.max_abs, cosine=f.cosine)
            if calibration is not None:
                d["calibrated"] = r.name in calibrated
            data.append(d)
        json.dump(data, out, indent=2, default=str)
        print(file=out)
        return 0

    headers = ["tensor", "shape", "stored", "dtype", "quant", "block", "bits/param"]
    right = [False, False, False, False, False, True, True]
    if calibration is not None:
        headers += ["calibrated"]
        right += [False]
    if args.compare:
        headers += ["SQNR dB", "max|err|", "cosine"]
        right += [True, True, True]
    if args.summary:
        # The totals below, and with --compare the tensors that lost the most.
        worst = sorted((f for f in fidelity.values() if f.status == "quantized"), key=lambda f: f.sqnr_db)[:5]
        shown = {f.name for f in worst}
        records_shown = [r for r in records if r.name in shown]
        records_shown.sort(key=lambda r: fidelity[r.name].sqnr_db)
    else:
        records_shown = records
    rows = []
    for r in records_shown:
        quant = (r.quant_type + ("+dq" if r.double_quant else "")) if r.quant_type else "-"
        row = [r.name, _shape(r.shape), r.stored_dtype, r.dtype, quant, str(r.blocksize or "-"),
               _fmt_float(r.bits_per_param, 3)]
        if calibration is not None:
            cal = calibrated.get(r.name)
            row.append(f"yes ({float(cal['error_ratio']):.2f}x err)" if isinstance(cal, dict) else
                       ("no (nearest)" if r.quant_type else ""))
        if args.compare:
            f = fidelity.get(r.name)
            if f is None or f.status not in ("quantized", "identical"):
                row += [f.status if f else "-", "", ""]
            elif f.status == "identical":
                row += ["identical", "0", "1"]
            else:
                row += [_fmt_float(f.sqnr_db), f"{f.max_abs:.3g}", f"{f.cosine:.5f}"]
        rows.append(row)
    if rows:
        if args.summary:
            print("lowest SQNR:", file=out)
        _table(headers, rows, right, out)

    total_numel = sum(r.numel for r in records)
    total_bytes = sum(r.bytes for r in records)
    q = [r for r in records if r.quant_type]
    q_numel, q_bytes = sum(r.numel for r in q), sum(r.bytes for r in q)
    print(file=out)
    print(f"tensors    {len(records)} ({len(q)} 4-bit, {len(records) - len(q)} other)", file=out)
    print(f"params     {_count(total_numel)} ({_count(q_numel)} in 4-bit weights)", file=out)
    print(f"size       {_bytes(total_bytes)}", file=out)
    if total_numel:
        qbits = f", {8 * q_bytes / q_numel:.3f} in 4-bit weights" if q_numel else ""
        print(f"bits/param {8 * total_bytes / total_numel:.3f} overall{qbits}", file=out)
    if calibration is not None:
        for line in _calibration_lines(calibration):
            print(line, file=out)
    if args.compare:
        t = fidelity_totals(fidelity.values())
        if t.tensors:
            print(f"fidelity   SQNR {_fmt_float(t.sqnr_db)} dB over all 4-bit weights, worst "
                  f"{_fmt_float(t.min_sqnr_db)} dB ({t.min_sqnr_tensor}); cosine {t.cosine:.5f}; "
                  f"max|err| {t.max_abs:.3g}", file=out)
        odd = [f for f in fidelity.values() if f.status not in ("quantized", "identical")]
        if odd:
            listed = ", ".join(f"{f.name} ({f.status})" for f in sorted(odd, key=lambda f: _natural_key(f.name))[:5])
            more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
            print(f"differs    {listed}{more}", file=out)
    return 0


def _inspect_gguf(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from .convert import inspect_gguf

    info = inspect_gguf(args.path)
    if args.json:
        data = [{**t.__dict__, "shape": list(t.shape), "bits_per_param": t.bits_per_param} for t in info.tensors]
        json.dump(data, out, indent=2, default=str)
        print(file=out)
        return 0
    headers = ["tensor", "shape", "type", "bits/param", "transformers name"]
    rows = [[t.name, _shape(t.shape), t.ggml_type + ("" if t.decodable else " (no decoder)"),
             _fmt_float(t.bits_per_param, 3), t.hf_name or "-"] for t in info.tensors]
    _table(headers, rows, [False, False, False, True, False], out)
    numel, size = sum(t.numel for t in info.tensors), sum(t.bytes for t in info.tensors)
    types: dict = {}
    for t in info.tensors:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    print(file=out)
    print(f"file       GGUF v{info.version}, architecture {info.architecture or '?'}, alignment {info.alignment}, "
          f"{len(info.metadata)} metadata keys", file=out)
    print(f"tensors    {len(info.tensors)} (" + ", ".join(f"{n} {k}" for k, n in sorted(types.items())) + ")", file=out)
    print(f"params     {_count(numel)}", file=out)
    print(f"size       {_bytes(size)}", file=out)
    if numel:
        print(f"bits/param {8 * size / numel:.3f} overall", file=out)
    unmapped = [t.name for t in info.tensors if t.hf_name is None]
    if unmapped and len(unmapped) < len(info.tensors):
        print(f"not loaded {_file_list(unmapped)} (transformers does not load them)", file=out)
    return 0


# ----------------------------------------------------------------------------------------------
# Entry point


def _plugin_modules() -> list[str]:
    """Modules ``qlora_rs.cli_*`` of this package, in name order."""
    package = __package__ or "qlora_rs"  # __name__ is "__main__" under python -m qlora_rs.cli
    here = os.path.dirname(__file__)
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules([here]) if m.name.startswith("cli_"))


_BUILTIN: dict[str, Callable[[Any], None]] = {"convert": _add_convert, "inspect": _add_inspect}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser. For a built-in ``command`` the plug-in modules are not imported
    (some import torch, which ``convert`` and ``inspect`` do not need)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="QLoRA with a Rust core: 4-bit checkpoints and training.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _BUILTIN.values():
        add(sub)
    if command in _BUILTIN:
        return parser
    for name in _plugin_modules():
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken plug-in must not take the other subcommands down
            _add_unavailable(sub, name, e)
            continue
        module.add_parser(sub)
    return parser


def _add_unavailable(sub: Any, module: str, error: Exception) -> None:
    """Registers a subcommand whose module failed to import; running it reports why."""
    command = module.rpartition(".")[2].removeprefix("cli_").replace("_", "-")
    reason = _one_line(error)
    p = sub.add_parser(command, help=f"(unavailable: {reason})")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)

    def fail(args: argparse.Namespace) -> int:
        print(f"{PROG} {command}: error: cannot load {module}: {reason}", file=sys.stderr)
        return 1

    p.set_defaults(func=fail)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    from .errors import QloraError

    argv = list(sys.argv[1:] if argv is None else argv)
    # torchao (which transformers imports when it is installed) logs a deprecation notice from
    # torch's pytree module on import: noise for a command-line user.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (QloraError, OSError) as e:
        # User errors: one line, no traceback. (Bugs still raise with a traceback.)
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
