"""The ``kinfonce`` command. Thin: each subcommand parses its flags, then calls a module.

Each subcommand lives in one ``_add_<name>`` function that registers its parser and sets
``func``; heavy imports happen inside the handlers so that ``kinfonce --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinfonce",
        description="Contrastive self-supervised learning with Kernel-InfoNCE losses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_synthetic,):
        add(sub)
    return parser


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    # Filled in by the synthetic-experiment work (issue 3).
    pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"kinfonce {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
