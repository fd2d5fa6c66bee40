"""What the ``qlora-rs`` commands print: sizes, counts, shapes, durations, aligned tables and
the progress bar, shared by every command module of :mod:`qlora_rs.cli`."""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Optional, Sequence, TextIO

PROG = "qlora-rs"


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


def _file_list(files: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f", ... ({len(files)} files)" if len(files) > limit else "")
