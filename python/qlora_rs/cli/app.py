"""The ``qlora-rs`` command line: the parser and the dispatcher.

Each subcommand is a module of this package (:mod:`qlora_rs.cli`) that defines
``add_parser(subparsers)``; ``add_parser`` adds its parser with ``subparsers.add_parser(...)`` and
sets ``func=handler`` (``handler(args) -> int``, the exit status) with ``set_defaults``.
``convert`` and ``inspect`` are built in (they need no torch); every other command module is
picked up automatically, imported only when a command other than those two runs.

User errors (bad input files, bad options, existing outputs) print one line on stderr and exit
with status 1; argument errors exit with 2 (argparse); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import Any, Callable, Optional, Sequence

from . import convert, inspect
from .output import PROG


_BUILTIN: dict[str, Callable[[Any], None]] = {"convert": convert.add_parser, "inspect": inspect.add_parser}
# Modules of this package that are not commands.
_NOT_COMMANDS = {"app", "output", "__main__", *_BUILTIN}


def _plugin_modules() -> list[str]:
    """The command modules of this package other than the built-in ones, in name order."""
    here = os.path.dirname(__file__)
    return sorted(f"{__package__}.{m.name}" for m in pkgutil.iter_modules([here]) if m.name not in _NOT_COMMANDS)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser. For a built-in ``command`` the plug-in modules are not imported
    (some import torch, which ``convert`` and ``inspect`` do not need)."""
    from .. import _lib

    parser = argparse.ArgumentParser(prog=PROG, description="QLoRA with a Rust core: 4-bit checkpoints and training.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_lib.__version__}")
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
    command = module.rpartition(".")[2].replace("_", "-")
    reason = _one_line(error)
    p = sub.add_parser(command, help=f"(unavailable: {reason})")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)

    def fail(args: argparse.Namespace) -> int:
        print(f"{PROG} {command}: error: cannot load {module}: {reason}", file=sys.stderr)
        return 1

    p.set_defaults(func=fail)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    from ..errors import QloraError

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

