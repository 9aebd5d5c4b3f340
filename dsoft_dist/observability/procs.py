"""The processes below a process, read from /proc (Linux): what the benchmarks measure and the tests police.

    from dsoft_dist.observability.procs import children, descendants, cmdline
    children(os.getpid())      # live direct children (zombies left out: they hold no memory and run nothing)
    descendants(os.getpid())   # children, their children, ... (a launcher's shell -> torchrun -> workers)
    live([pid1, pid2])         # those of the pids still running (neither ended nor zombies)
"""
from __future__ import annotations

import os


def cmdline(pid: int) -> bytes:
    """The process's command line, arguments separated by NUL bytes (b"" when it has ended)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every live (not zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:  # the process ended meanwhile
                continue
            if state != "Z":
                out[int(entry)] = int(ppid)
    return out


def live(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (neither ended nor zombies), in their order."""
    running = _parents()
    return [pid for pid in pids if pid in running]


def children(parent: int) -> list[int]:
    """The live direct children of ``parent``, sorted."""
    return sorted(pid for pid, ppid in _parents().items() if ppid == parent)


def descendants(parent: int) -> list[int]:
    """Every live process below ``parent`` at any depth, sorted."""
    by_parent: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        by_parent.setdefault(ppid, []).append(pid)
    found, todo = [], list(by_parent.get(parent, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += by_parent.get(pid, [])
    return sorted(found)
