"""The `fastgpt` command line.

Each subcommand lives in its own module of this package and exposes
`register(subparsers)`, which adds its parser and sets `func`. Modules import
torch and friends inside their handlers, so `fastgpt --help` stays quick.
Bad input raises `FastGPTError`, printed here as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import FastGPTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgpt",
        description="GPT-2-family LLM engine: prepare data, pretrain, fine-tune, generate, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastGPTError as err:
        print(f"fastgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
