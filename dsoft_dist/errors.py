"""User-facing errors and the exit codes they become: the bottom layer, importing nothing of the package.

A user error means "the input is wrong", not "the code is wrong": it is reported as one line,
``dsoft <command>: error: <message>``, and exit code 2, where any other exception (a bug) keeps
its traceback. ``DSOFT_TRACEBACK=1`` re-raises user errors too, for developers.

    from dsoft_dist.errors import ConfigError, run_command
    raise ConfigError("head.scale=-1 is invalid: must be in (0, 1024]")
    sys.exit(run_command("dsoft train", func, args))   # the error line and exit code for the user

Exit codes: 0 done, 2 a user error (``USER_ERROR_EXIT``), 75 preempted after a checkpoint
(``PREEMPTED_EXIT_CODE``: a Slurm script requeues on it), 76 a hung rank detected (``HUNG_EXIT_CODE``: every
rank exits so that the launcher restarts the job), 130 Ctrl-C (``INTERRUPTED_EXIT``).
"""
from __future__ import annotations

import os
import sys

USER_ERROR_EXIT, INTERRUPTED_EXIT = 2, 130
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a Slurm script requeues on it
HUNG_EXIT_CODE = 76  # a rank stopped making progress (parallel.watchdog): every rank exits, the launcher restarts
TRACEBACK_VARIABLE = "DSOFT_TRACEBACK"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the folder, the file and what is wrong."""


class BadDataError(RuntimeError):
    """Raised under the ``fail`` bad-data policy: names the shard, the sample and the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong", not "the code is wrong".

    OSError (missing, unreadable, not-a-folder paths), ValueError (bad values; ConfigError,
    ManifestError, BinFormatError, RecordIOError, BadSample and json.JSONDecodeError are
    ValueErrors), yaml and tar errors, BadDataError and CheckpointError. yaml is imported
    here, only when an error is being reported, so ``dsoft --help`` stays fast.
    """
    import tarfile  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    return OSError, ValueError, tarfile.TarError, yaml.YAMLError, BadDataError, CheckpointError


def traceback_wanted() -> bool:
    """True when ``DSOFT_TRACEBACK`` is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


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


def run_command(command: str, func, args) -> int:
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
