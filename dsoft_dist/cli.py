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
import os
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
    "dsoft_dist.plan.cli",
)
USER_ERROR_EXIT, INTERRUPTED_EXIT = 2, 130
TRACEBACK_VARIABLE = "DSOFT_TRACEBACK"


def version() -> str:
    """The installed package's version (its metadata), else ``dsoft_dist.__version__`` (a source checkout)."""
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("dsoft_dist")
    except metadata.PackageNotFoundError:
        from dsoft_dist import __version__  # noqa: PLC0415

        return __version__


def plain_help(text: str | None) -> str | None:
    """Help text without reStructuredText literals: ````x```` -> ```x``` (descriptions come from module docs)."""
    return text.replace("``", "`") if text else text


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


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong", not "the code is wrong".

    OSError (missing, unreadable, not-a-folder paths), ValueError (bad values; ConfigError,
    ManifestError, BinFormatError, RecordIOError, BadSample and json.JSONDecodeError are
    ValueErrors), yaml and tar errors, and the project's BadDataError and CheckpointError.
    Imported here, only when an error is being reported, so ``dsoft --help`` stays fast.
    """
    import tarfile  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from dsoft_dist.data.shards import BadDataError  # noqa: PLC0415
    from dsoft_dist.train.checkpoint import CheckpointError  # noqa: PLC0415

    return OSError, ValueError, tarfile.TarError, yaml.YAMLError, BadDataError, CheckpointError


def error_line(command: str, err: BaseException) -> str:
    """``<command>: error: <message>`` on one line (a multi-line message is joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = "; ".join(lines) or type(err).__name__
    return f"{command}: error: {message} ({TRACEBACK_VARIABLE}=1 for a traceback)"


def report_user_error(command: str, err: BaseException) -> None:
    """For a subcommand that maps a user error to its own exit code: re-raises ``err`` with DSOFT_TRACEBACK=1,
    else writes ``error_line`` to stderr. Call it inside the ``except`` block."""
    if traceback_wanted():
        raise err
    sys.stderr.write(error_line(command, err) + "\n")


def traceback_wanted() -> bool:
    """True when ``DSOFT_TRACEBACK`` is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def run_command(command: str, func, args: argparse.Namespace) -> int:
    """Runs ``func(args)`` and returns its exit code; a user error becomes one stderr line and exit 2.

    KeyboardInterrupt exits 130. With DSOFT_TRACEBACK=1 both are re-raised (the traceback is shown).
    """
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if traceback_wanted():
            raise
        sys.stderr.write(f"{command}: interrupted\n")
        return INTERRUPTED_EXIT
    except user_errors() as err:  # evaluated only when an exception arrives here
        report_user_error(command, err)
        return USER_ERROR_EXIT


def _rank_with_user_errors(command: str, error_dir: str, fn, *args) -> None:
    """``fn(*args)`` in a rank ``spawn_ranks`` started: a user error is written as one line to
    ``error_dir/rank<R>.txt`` for the parent to print once, and the rank exits 2 (so the parent does not
    re-raise every rank's traceback); a non-zero return code becomes the rank's exit code."""
    try:
        code = fn(*args)
    except user_errors() as err:
        if traceback_wanted():
            raise
        with open(os.path.join(error_dir, f"rank{os.environ['RANK']}.txt"), "w", encoding="utf-8") as fh:
            fh.write(error_line(command, err))
        code = USER_ERROR_EXIT
    if code:
        raise SystemExit(code)


def spawn_ranks(command: str, fn, nproc: int, args: tuple = (), stopped_note: str = "") -> int:
    """Runs ``fn(*args)`` (importable: spawn pickles it by name) in ``nproc`` local ranks
    (``train.distributed.spawn_local``). Returns 0; or 2 after printing once, as ``command: error: ...``, the
    user error of the failing rank, or of the first rank that wrote one (a rank that met a user error inside a
    collective makes the others fail too, and any of them may be seen first); or 128 + N with a message when a
    rank was stopped by SIGINT/SIGTERM (signal N) before it could install handlers of its own (``stopped_note``
    says what to do then). Any other failure is re-raised."""
    import tempfile  # noqa: PLC0415

    from torch.multiprocessing.spawn import ProcessException  # noqa: PLC0415

    from dsoft_dist.train.distributed import spawn_local  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="dsoft-rank-errors-") as error_dir:
        try:
            spawn_local(_rank_with_user_errors, nproc, (command, error_dir, fn, *args))
        except ProcessException as err:  # a rank exited (ProcessExitedException) or raised
            if getattr(err, "exit_code", 0) < 0 and err.signal_name in ("SIGINT", "SIGTERM"):
                sys.stderr.write(f"{command}: local rank {err.error_index} was stopped by {err.signal_name} while "
                                 f"starting{'; ' + stopped_note if stopped_note else ''}\n")
                return 128 - err.exit_code
            reports = [f"rank{err.error_index}.txt"] + sorted(os.listdir(error_dir))
            report = next((os.path.join(error_dir, r) for r in reports if os.path.isfile(os.path.join(error_dir, r))),
                          None)
            if report is None:  # no rank met a user error: a bug, re-raised with its traceback
                raise
            with open(report, encoding="utf-8") as fh:
                sys.stderr.write(fh.read() + "\n")
            return USER_ERROR_EXIT
    return 0


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
