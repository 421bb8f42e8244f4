"""Command line: ``llc-fast COMMAND`` (also ``python -m llc_fast COMMAND``).

Each command lives in its own module with an ``add_parser(subparsers)`` function that registers
it and sets ``func``; ``COMMANDS`` lists them. Modules import torch and the package lazily so
``llc-fast --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "calibrate", "estimate", "checkpoints", "restricted", "bif")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llc-fast", description="Fast Local Learning Coefficient estimation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
