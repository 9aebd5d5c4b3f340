"""The suite's own rules (tests/conftest.py, pytest.ini; docs/testing.md), checked in a pytest run of their own:
the default tier leaves out tests marked slow and ``-m slow`` runs only them, a hung test fails by name at the
per-test timeout, and a test that leaves a process or a /dev/shm segment behind fails by name.

    python -m pytest tests/test_testing.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

INNER = '''
import os, subprocess, sys, time
import pytest

def test_clean():
    subprocess.run([sys.executable, "-c", "pass"], check=True)  # a child that ends: not a leak

def test_leaves_a_process():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

def test_leaves_shm():
    open("/dev/shm/dsoft-test-leak-{pid}", "w").close()

@pytest.mark.timeout(2)
def test_hangs():
    time.sleep(60)

@pytest.mark.slow(reason="the rule's own check")
def test_marked_slow():
    pass
'''


def _pytest(tmp_path: Path, *args: str, more: str = "") -> tuple[dict[str, str], str]:
    """Runs pytest on INNER (+ ``more``) with the project's conftest and pytest.ini; returns {test name: outcome}
    and the output."""
    (tmp_path / "test_inner.py").write_text(INNER.replace("{pid}", str(os.getpid())) + more)
    (tmp_path / "conftest.py").write_text("import tests.conftest\nfrom tests.conftest import *  # noqa: F401,F403\n"
                                          "tests.conftest.LEAK_GRACE_S = 0.5\n")  # the leaks here are for good
    ini = (REPO / "pytest.ini").read_text().replace("testpaths = tests", "testpaths = .")
    (tmp_path / "pytest.ini").write_text(ini)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for status, name in re.findall(r"^(PASSED|FAILED|ERROR) test_inner\.py::(\w+)", proc.stdout, re.M):
        outcomes[name] = outcomes.get(name, "") + status.lower()  # "passederror": passed, then failed teardown
    return outcomes, proc.stdout + proc.stderr


def test_default_tier_timeout_and_leak_checks(tmp_path):
    outcomes, out = _pytest(tmp_path)
    assert outcomes == {"test_clean": "passed", "test_leaves_a_process": "passederror",
                        "test_leaves_shm": "passederror", "test_hangs": "failed"}, out  # test_marked_slow left out
    assert "1 deselected" in out and "1 slow tests left out" in out
    assert "test_leaves_a_process left behind processes" in out and "time.sleep(120)" in out
    assert f"dsoft-test-leak-{os.getpid()}" in out and not os.path.exists(f"/dev/shm/dsoft-test-leak-{os.getpid()}")
    assert "Timeout" in out  # pytest-timeout's failure names the test


def test_slow_tier_and_named_files(tmp_path):
    outcomes, out = _pytest(tmp_path, "-m", "slow")
    assert outcomes == {"test_marked_slow": "passed"}, out
    outcomes, out = _pytest(tmp_path, "test_inner.py::test_marked_slow", "test_inner.py::test_clean")
    assert outcomes == {"test_marked_slow": "passed", "test_clean": "passed"}, out  # a named test runs in any tier


def test_a_slow_marker_without_a_reason_is_refused(tmp_path):
    outcomes, out = _pytest(tmp_path, "-m", "slow", more="\n@pytest.mark.slow\ndef test_unexplained():\n    pass\n")
    assert outcomes == {} and "marked slow without a reason, e.g. test_inner.py::test_unexplained" in out, out


def test_docs_name_the_tiers():
    text = (REPO / "docs" / "testing.md").read_text()
    for command in ("python -m pytest -q -m slow", "python -m pytest tests/test_losses_reference.py",
                    "-m gpu"):
        assert command in text, command
    assert '@pytest.mark.slow(reason="...")' in text
