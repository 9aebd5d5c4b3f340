"""The ``dsoft`` command: one subcommand per capability that exists.

Each capability lives in its own module exposing ``register(subparsers)``; that
function adds its parser and sets ``func`` (called with the parsed namespace, returns
an exit code). Add a module to ``COMMAND_MODULES`` when its subcommand is real.

    dsoft --help
    dsoft --version                                  # dsoft 0.1.0
    dsoft config show configs/demo.yaml --set head.scale=32

Expected user errors (a missing or unreadable file, a bad value, bad data: see
``user_errors``) raised by a subcommand become one line on stderr,
``dsoft <subcommand>: error: <message>``, and exit code 2 (130 for Ctrl-C); bugs
(any other exception) keep their traceback. ``DSOFT_TRACEBACK=1`` re-raises the user
errors too, for developers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dsoft_dist.errors import run_command
from dsoft_dist.utils import plain_help

COMMAND_MODULES = (
    "dsoft_dist.train.cli",
    "dsoft_dist.train.ckpt_cli",
    "dsoft_dist.launch.doctor",
    "dsoft_dist.demo",
    "dsoft_dist.config.cli",
    "dsoft_dist.data.cli",
    "dsoft_dist.eval.cli",
    "dsoft_dist.bench.cli",
    "dsoft_dist.plan.cli",
)
def version() -> str:
    """The installed package's version (its metadata), else ``dsoft_dist.__version__`` (a source checkout)."""
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("dsoft_dist")
    except metadata.PackageNotFoundError:
        from dsoft_dist.utils import __version__  # noqa: PLC0415

        return __version__


def tidy_help(parser: argparse.ArgumentParser, summary: str | None = None) -> None:
    """Cleans the help of ``parser`` and of every subparser under it, in place, after registration.

    Double backticks become single ones in descriptions, epilogs and argument help; a subcommand
    registered without a description gets its one-line summary (``help=``) as one.
    """
    parser.description = plain_help(parser.description) or summary
    parser.epilog = plain_help(parser.epilog)
    for action in parser._actions:
        action.help = plain_help(action.help)
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for choice in action._choices_actions:  # the COMMAND list's one-line summaries
                choice.help = plain_help(choice.help)
            for name, sub in action.choices.items():
                tidy_help(sub, plain_help(summaries.get(name)))


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with every registered subcommand (help texts tidied, see ``tidy_help``)."""
    parser = argparse.ArgumentParser(
        prog="dsoft",
        description="dsoft-dist: distributed dissected-softmax training for large-class embedding models.",
    )
    parser.add_argument("--version", action="version", version=f"dsoft {version()}",
                        help="print the installed dsoft_dist version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    tidy_help(parser)
    return parser


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """'dsoft data synth' for the parsed namespace: the ``dest`` of each nested subparser action in turn."""
    words = [parser.prog]
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, action.dest, None) if action is not None else None
        if chosen is None or chosen not in action.choices:
            return " ".join(words)
        words.append(chosen)
        parser = action.choices[chosen]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dsoft`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(command_name(parser, args), args.func, args)


if __name__ == "__main__":
    sys.exit(main())
