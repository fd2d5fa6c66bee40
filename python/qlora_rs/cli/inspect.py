"""``qlora-rs inspect``: the tensors of a checkpoint (or a GGUF file), their formats and sizes, and
with ``--compare`` the fidelity of a 4-bit checkpoint against its source."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Optional, TextIO

from .convert import _calibration_lines
from .output import ProgressBar, _bytes, _count, _file_list, _natural_key, _shape, _table


def add_parser(sub: Any) -> None:
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
    p.set_defaults(func=run)


def _fmt_float(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    import json

    from ..io.convert import calibration_record, compare_checkpoints, fidelity_totals, inspect_checkpoint, is_gguf

    out = out if out is not None else sys.stdout
    if is_gguf(args.path):
        if args.compare:
            from ..errors import InvalidArgumentError

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

    from ..io.convert import inspect_gguf

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
