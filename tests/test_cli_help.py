"""`dsoft --version` and the help of every subcommand: usage names the real command, a description,
help for every option, no reStructuredText double backticks.

Every parser is found by walking argparse's subparser actions from ``build_parser()``; the
benchmarks (``dsoft bench NAME``, whose ARGS go to each benchmark's own parser) are walked
through ``dsoft_dist.bench.cli.BENCHMARKS``, so a new subcommand or benchmark is covered too.
Help is read as the user sees it: ``dsoft_dist.cli.main([..., "--help"])`` in this process.
"""
import argparse
import importlib
from importlib import metadata

import pytest

from dsoft_dist.bench.cli import BENCHMARKS
from dsoft_dist.cli import build_parser, main


def parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, parser) for ``parser`` and every subparser under it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, path + (name,))


def bench_parsers():
    """(("bench", NAME), parser) for each benchmark that builds its parser in ``build_parser``."""
    for name in sorted(BENCHMARKS):
        module = importlib.import_module(f"dsoft_dist.bench.{name}")
        if hasattr(module, "build_parser"):
            yield ("bench", name), module.build_parser()


def every_command() -> list[tuple]:
    return [path for path, _ in parsers(build_parser())] + [("bench", name) for name in sorted(BENCHMARKS)]


def help_text(path: tuple, capsys) -> str:
    """What ``dsoft PATH --help`` prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"dsoft {metadata.version('dsoft_dist')}\n"


def test_no_help_output_shows_double_backticks(capsys):
    commands = every_command()
    assert ("demo",) in commands and ("ckpt", "inspect") in commands and ("bench", "speedup") in commands
    shown = {" ".join(path): help_text(path, capsys) for path in commands}
    assert [name for name, text in shown.items() if "``" in text] == []
    assert "`dsoft ckpt inspect PATH`" in shown["ckpt"]  # the module doc's literal, now in single backticks


def test_every_subcommand_has_a_description(capsys):
    missing = [" ".join(path) for path, p in parsers(build_parser()) if not p.description]
    assert missing == []
    assert "synthetic identities" in help_text(("demo",), capsys).split("options:")[0]


def test_every_option_has_help():
    found, walked = {}, []
    for path, p in [*parsers(build_parser()), *bench_parsers()]:
        walked.append(path)
        no_help = {a.option_strings[-1] for a in p._actions if a.option_strings and not a.help}
        if no_help:
            found[path] = no_help
    assert {("data", "make-bin"), ("plan",), ("bench", "speedup"), ("bench", "kernels")} <= set(walked)
    assert found == {}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_bench_usage_names_dsoft_bench(name, capsys):
    text = help_text(("bench", name), capsys)
    assert text.startswith(f"usage: dsoft bench {name} "), text.splitlines()[0]
    assert "python -m" not in text.splitlines()[0]
