"""The ``qlora-rs`` command line: :mod:`~qlora_rs.cli.app` parses and dispatches, one module per
command (``convert``, ``inspect``, ``train``, ``merge``, ``plan``, ``chat``, ``eval``), and
:mod:`~qlora_rs.cli.output` holds what they print with."""

from .app import build_parser, main
from .output import ProgressBar

__all__ = ["main", "build_parser", "ProgressBar"]
