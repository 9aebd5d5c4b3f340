"""The ``dsoft`` command: one subcommand per capability that exists.

Each capability lives in its own module exposing ``register(subparsers)``; that
function adds its parser and sets ``func`` (called with the parsed namespace, returns
an exit code). Add a module to ``COMMAND_MODULES`` when its subcommand is real.

    dsoft --help
    dsoft config show configs/demo.yaml --set head.scale=32
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "dsoft_dist.train.cli",
    "dsoft_dist.train.ckpt_cli",
    "dsoft_dist.launch.doctor",
    "dsoft_dist.demo",
    "dsoft_dist.config.cli",
    "dsoft_dist.data.cli",
    "dsoft_dist.eval.cli",
    "dsoft_dist.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="dsoft",
        description="dsoft-dist: distributed dissected-softmax training for large-class embedding models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dsoft`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
