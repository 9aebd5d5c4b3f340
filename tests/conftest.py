"""Shared test setup: deterministic CPU threads, the Triton interpreter without CUDA, a free-port fixture,
the two tiers (docs/testing.md) and the leak check: a test that leaves a process or a /dev/shm segment
behind fails by name (the leftovers are killed / removed so that the next test starts clean)."""
import gc
import os
import signal
import time

import pytest
import torch

if not torch.cuda.is_available():  # Triton picks interpreter vs compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsoft_dist.observability.procs import cmdline, descendants  # noqa: E402
from dsoft_dist.parallel import free_port  # noqa: E402  (after the interpreter switch)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# services a process starts once and keeps for its life: multiprocessing's, and wandb's (one per process, for
# every run in it; wandb.finish() ends the run, not the service)
LONG_LIVED_HELPERS = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver", b"wandb/bin/wandb-core")
LEAK_GRACE_S = 5.0  # how long a finished test's children may take to exit (DataLoader workers, gloo teardown)


@pytest.fixture
def port() -> int:
    return free_port()


# ----------------------------------------------------------------------------- tiers

_SLOW_LEFT_OUT = pytest.StashKey[int]()


def _names_tests(config: pytest.Config) -> bool:
    """True when the command line names test files or test ids (``pytest tests/test_x.py::test_y``)."""
    return config.args_source == pytest.Config.ArgsSource.ARGS and any(
        ".py" in arg for arg in config.args)


def _slow_without_reason(items: list[pytest.Item]) -> list[str]:
    return [item.nodeid for item in items
            if any(not mark.kwargs.get("reason") for mark in item.iter_markers("slow"))]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default tier: without ``-m`` and without named test files, tests marked ``slow`` are deselected.
    Every ``slow`` marker says why the test cannot be fast: ``@pytest.mark.slow(reason="...")``."""
    unexplained = _slow_without_reason(items)
    if unexplained:
        raise pytest.UsageError(f"{len(unexplained)} tests are marked slow without a reason, e.g. {unexplained[0]}: "
                                "write @pytest.mark.slow(reason=\"why it cannot be fast\") (docs/testing.md)")
    if config.option.markexpr or _names_tests(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.stash[_SLOW_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"default tier: {left_out} slow tests left out; run them with "
                                    "python -m pytest -q -m slow (docs/testing.md)")


# ----------------------------------------------------------------------------- leaks

def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _leftover_processes(before: set[int]) -> list[int]:
    """This process's descendants started during the test and still alive, helpers excepted."""
    return [pid for pid in descendants(os.getpid())
            if pid not in before and not any(h in cmdline(pid) for h in LONG_LIVED_HELPERS)]


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Fails the test that leaves a process or a /dev/shm segment behind, after a grace period."""
    procs, shm = set(descendants(os.getpid())), _shm()
    yield
    deadline, collected = time.monotonic() + LEAK_GRACE_S, False
    while True:
        left_procs, left_shm = _leftover_processes(procs), _shm() - shm
        if not (left_procs or left_shm) or time.monotonic() > deadline:
            break
        if not collected:  # an unreachable DataLoader iterator in a reference cycle ends its workers when collected
            gc.collect()
            collected = True
        time.sleep(0.05)
    named = [f"pid {pid}: " + cmdline(pid).replace(b"\0", b" ").decode(errors="replace")[:200] for pid in left_procs]
    for pid in left_procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for name in left_shm:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    if named or left_shm:
        pytest.fail(f"{request.node.nodeid} left behind processes {named} and /dev/shm segments {sorted(left_shm)}",
                    pytrace=False)
