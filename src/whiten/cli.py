"""The ``whiten`` command line: ``whiten bench ...``, ``whiten plot ...``, ``whiten diagnose ...``.

Each consumer package registers its own sub-commands through a ``register(subparsers)``
function, so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ("whiten.bench.cli", "whiten.diagnostics.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whiten", description="Matrix-whitening optimizers: benchmark and diagnostics."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves (--nproc)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # a bad configuration or path (missing file, --out that is a file, ...): one line, exit 2, no traceback
        command = " ".join(str(c) for c in (args.command, getattr(args, "instrument", None)) if c)
        message = f"{err.strerror}: {err.filename!r}" if isinstance(err, OSError) and err.filename else err
        print(f"whiten {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
