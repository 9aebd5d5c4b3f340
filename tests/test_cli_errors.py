"""Every `dsoft` subcommand turns a bad path or value into one short error line and a non-zero exit, no traceback.

The table below has one row per subcommand the parser has (found by walking argparse's
subparser actions, so a new subcommand without a row fails `test_table_covers_every_subcommand`).
Each row runs ``dsoft_dist.cli.main`` in this process, its output read at the file descriptors (so
the spawned ranks' and the loggers' lines count too); a console-script subprocess costs ~2 s of
start-up per row. The representative row also runs the real console script in a subprocess, and
``test_dsoft_traceback_shows_the_traceback`` checks the script's own exit path.
"""
import argparse
import os
import subprocess
import sys

import pytest

from dsoft_dist.cli import build_parser, main
from dsoft_dist.errors import USER_ERROR_EXIT, run_command

MISSING = "{tmp}/missing"  # never created
FILE = "{tmp}/a-file"  # a regular file holding invalid YAML: outputs "beneath" it cannot be created

# subcommand path -> (argv, the text the error must name: the bad path or value)
ROWS = {
    "train": (["train", "--config", f"{MISSING}/c.yaml"], f"{MISSING}/c.yaml"),
    "demo": (["demo", "--config", f"{MISSING}/c.yaml"], f"{MISSING}/c.yaml"),
    "doctor": (["doctor", "--config", f"{MISSING}/c.yaml"], f"{MISSING}/c.yaml"),
    "config show": (["config", "show", f"{MISSING}/c.yaml"], f"{MISSING}/c.yaml"),
    "config check": (["config", "check", FILE], FILE),  # a YAML syntax error
    "ckpt inspect": (["ckpt", "inspect", f"{MISSING}/ckpt"], f"{MISSING}/ckpt"),
    "ckpt export": (["ckpt", "export", f"{MISSING}/ckpt", "{tmp}/out"], f"{MISSING}/ckpt"),
    "ckpt import": (["ckpt", "import", "--from", "insightface", f"{MISSING}/backbone.pth", "--model", "r18",
                     "{tmp}/r18.pt"], f"{MISSING}/backbone.pth"),
    "data synth": (["data", "synth", f"{FILE}/out", "--identities", "2"], f"{FILE}/out"),
    "data from-rec": (["data", "from-rec", f"{MISSING}/train.rec", "{tmp}/out"], f"{MISSING}/train.rec"),
    "data from-folder": (["data", "from-folder", f"{MISSING}/faces", "{tmp}/out"], f"{MISSING}/faces"),
    "data make-bin": (["data", "make-bin", "{tmp}/v.bin", "--folder", f"{MISSING}/faces"], f"{MISSING}/faces"),
    "data align": (["data", "align", f"{MISSING}/faces", "{tmp}/out", "--landmarks", f"{MISSING}/lm.txt"],
                   f"{MISSING}/faces"),
    "data verify": (["data", "verify", f"{MISSING}/shards"], f"{MISSING}/shards"),
    "data from-npy": (["data", "from-npy", f"{MISSING}/f.npy", f"{MISSING}/l.npy", "{tmp}/out"], f"{MISSING}/f.npy"),
    "eval": (["eval", "--checkpoint", f"{MISSING}/backbone.pt", "--bin", f"{MISSING}/lfw.bin"],
             f"{MISSING}/backbone.pt"),
    "export": (["export", "--checkpoint", f"{MISSING}/backbone.pt", "{tmp}/b.onnx"], f"{MISSING}/backbone.pt"),
    "bench data": (["bench", "data", "--workers", "x"], "--workers 'x'"),
    "bench head": (["bench", "head", "--classes", "-5"], "num_classes=-5"),
    "bench kernels": (["bench", "kernels", "--out", f"{FILE}/k.json"], FILE),
    "bench speedup": (["bench", "speedup", "--rates", "3/2"], "--rates '3/2'"),
    "bench accuracy": (["bench", "accuracy", "--parts", "audio"], "--parts 'audio'"),
    "bench dissection": (["bench", "dissection", "--classes", "1"], "--classes '1'"),
    "bench logit_cache": (["bench", "logit_cache", "--rate", "2"], "--rate '2'"),
    "bench stream": (["bench", "stream", "--identities", "4", "--workers", "0", "--keep", f"{FILE}/shards"],
                     f"{FILE}/shards"),
    "bench train": (["bench", "train", "--classes", "-9"], "num_classes=-9"),
    "bench backbone": (["bench", "backbone", "--batch", "0"], "--batch 0"),
    "bench chaos": (["bench", "chaos", "--world-sizes", "2,x"], "--world-sizes '2,x'"),
    "bench terms": (["bench", "terms", "--runs", f"{MISSING}/run"], f"{MISSING}/run"),
    "plan": (["plan", "--classes", "1000000", "--gpus", "8", "--sample-rate", "3/2"], "--sample-rate '3/2'"),
}
DEMO_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
# more bad inputs for subcommands that read several kinds of file
EXTRA_ROWS = [
    # a bad path found inside 2 spawned ranks: reported once by the parent, not as each rank's traceback
    (["train", "--config", DEMO_YAML, "--nproc", "2", "--set", f"eval.bins=[{MISSING}/v.bin]", "--set",
      "logging.output_dir={tmp}/run"], f"{MISSING}/v.bin"),
    (["eval", "--identify", f"{MISSING}/probes", f"{MISSING}/gallery"], f"{MISSING}/probes"),
    (["eval", "--identify", "{tmp}/bad.npz", "{tmp}/bad.npz"], "{tmp}/bad.npz"),  # not a zip archive
    (["eval", "--pairs", "{tmp}/bad.npz"], "{tmp}/bad.npz"),
    (["eval", "--checkpoint", FILE, "--ijb", f"{MISSING}/IJBC"], f"{MISSING}/IJBC"),
    (["export", "--checkpoint", FILE, "{tmp}/b.onnx"], FILE),  # not a torch file
    (["ckpt", "inspect", "{tmp}/ckpt-bad-manifest"], "{tmp}/ckpt-bad-manifest/manifest.json"),  # not JSON
    # a grid key the config does not have: refused before anything trains, with the loader's own message
    (["bench", "accuracy", "--out", "{tmp}/acc", "--sweep", "head.scal=32,64"], "unknown key 'head.scal'"),
]
FAST_ROW = "eval"  # the representative row, also run through the console script


def subcommands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[str]:
    """Every leaf command path, e.g. 'data synth': nested subparser actions, then a first positional with
    choices (``bench NAME``, ``config show|check``) counts as one more level."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [path for name, sub in action.choices.items() for path in subcommands(sub, prefix + (name,))]
    positional = next((a for a in parser._actions if not a.option_strings and a.dest != "help"), None)
    if positional is not None and positional.choices:
        return [" ".join(prefix + (str(choice),)) for choice in positional.choices]
    return [" ".join(prefix)]


def dsoft_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m dsoft_dist.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "dsoft")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "dsoft_dist.cli"]


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "a-file").write_text("model: [unclosed\n")
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive at all")
    (tmp_path / "ckpt-bad-manifest").mkdir()
    (tmp_path / "ckpt-bad-manifest" / "manifest.json").write_text("{not json")
    return tmp_path


def run_dsoft(argv: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    return subprocess.run(dsoft_command() + argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "disabled", "DSOFT_TRACEBACK": "", **env})


def run_in_process(argv: list[str], tmp_path, capfd, monkeypatch) -> tuple[int, str, str]:
    """``dsoft ARGV`` through ``main`` in this process, as the console script runs it (cwd, environment);
    returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("DSOFT_TRACEBACK", "")
    capfd.readouterr()
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def check_one_line_error(code: int, stdout: str, stderr: str, token: str, tmp_path) -> None:
    """Exit 2 (USER_ERROR_EXIT, config errors included) and the bad value named on one ``dsoft <subcommand>: ...``
    line, no traceback."""
    token = token.replace("{tmp}", str(tmp_path))
    out = stdout + stderr
    assert code == USER_ERROR_EXIT, out
    assert "Traceback" not in out, out
    named = [line for line in stderr.splitlines() if token in line]
    assert len(named) == 1, f"{token!r} should be named on one stderr line:\n{stderr}"
    assert named[0].startswith("dsoft "), named[0]  # "dsoft <subcommand>: ...", not a log record or a raw repr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 2, stderr


def test_table_covers_every_subcommand():
    found = set(subcommands(build_parser()))
    assert {"eval", "data synth", "ckpt inspect", "bench head", "config show"} <= found  # the walk works
    assert sorted(found - set(ROWS)) == [], "add a row to ROWS for each new subcommand"
    assert sorted(set(ROWS) - found) == [], "ROWS has a row for a subcommand the parser no longer has"


def test_representative_subcommand_fails_on_one_line(workspace):
    argv, token = ROWS[FAST_ROW]
    proc = run_dsoft(argv, workspace)  # the real console script
    check_one_line_error(proc.returncode, proc.stdout, proc.stderr, token, workspace)


@pytest.mark.parametrize("path", sorted(ROWS))
def test_bad_input_is_one_line_without_traceback(path, workspace, capfd, monkeypatch):
    argv, token = ROWS[path]
    check_one_line_error(*run_in_process(argv, workspace, capfd, monkeypatch), token, workspace)


@pytest.mark.parametrize("argv,token", EXTRA_ROWS, ids=[" ".join(a[:2]) for a, _ in EXTRA_ROWS])
def test_more_bad_files_are_one_line(argv, token, workspace, capfd, monkeypatch):
    check_one_line_error(*run_in_process(argv, workspace, capfd, monkeypatch), token, workspace)


def test_dsoft_traceback_shows_the_traceback(workspace, monkeypatch):
    argv = [a.replace("{tmp}", str(workspace)) for a in ROWS[FAST_ROW][0]]
    monkeypatch.setenv("DSOFT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="backbone.pt"):
        main(argv)
    proc = run_dsoft(ROWS[FAST_ROW][0], workspace, DSOFT_TRACEBACK="1")
    assert proc.returncode == 1  # Python's own exit code for an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr and "FileNotFoundError" in proc.stderr
    monkeypatch.setenv("DSOFT_TRACEBACK", "0")
    assert main(argv) == 2


def test_handler_keeps_bugs_and_maps_interrupts(capsys):
    def bug(args):
        raise RuntimeError("a real bug")

    def interrupted(args):
        raise KeyboardInterrupt

    def bad_value(args):
        raise ValueError("first line\n  second line")

    with pytest.raises(RuntimeError, match="a real bug"):  # not a user error: the traceback stays
        run_command("dsoft x", bug, argparse.Namespace())
    assert run_command("dsoft x", interrupted, argparse.Namespace()) == 130
    assert run_command("dsoft x", bad_value, argparse.Namespace()) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "dsoft x: interrupted"
    assert err[1].startswith("dsoft x: error: first line; second line") and len(err) == 2
