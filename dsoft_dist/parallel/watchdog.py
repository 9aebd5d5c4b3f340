"""Hung-rank detection: a rank that stops making progress (blocked, not dead) ends the job, named.

    watchdog = Watchdog(env.rank, env.world_size, cfg.parallel.hang_timeout_minutes)  # a thread when P > 1
    watchdog.mark("data", step=state.step)   # the main thread: a tuple assignment, nothing more
    watchdog.mark("forward")                 # the same step, further along
    watchdog.stop()

Each rank's mark is (step, micro-batch, phase): ``step`` is the optimizer steps finished, the phase
what the rank does now, in the order of ``PHASES`` (verification and the checkpoint come after a
step, then the next step's data, forward, head, backward and update). A daemon thread publishes the
rank's mark to the launcher's c10d store when it changed (about once a second) and reads one counter
that every rank's publication counts up. A rank waiting in a collective for a blocked one stops
moving too, so the test of a hang is: neither this rank's mark nor the counter moved for the timeout
on this rank's monotonic clock. Then the thread reads every rank's mark, logs one error naming the
rank(s) with the lowest mark (the one behind: its last finished step and its phase; "no single rank
is behind" when all are equal), and ends its process with ``HUNG_EXIT_CODE`` by ``os._exit``: the
main thread is blocked in a C collective and cannot be interrupted. Every rank does this at about
the same moment, so torchrun (``--max-restarts``; the Slurm script runs it too) restarts the whole job at
once, without its SIGTERM-then-SIGKILL grace, and ``checkpoint.resume=auto`` resumes it from the newest
checkpoint.

The thread uses a store client of its own (``TCPStore`` at MASTER_ADDR:MASTER_PORT): the process
group's client serializes its calls, so a main thread blocked in a store wait (a group being created,
NCCL's start-up) would block the watchdog behind it. Keys are under a prefix per torchrun attempt
(the agent's store outlives a restart) and per Watchdog of this process (ranks create their trainers
in the same order), so a restarted job or a second run in one process group never reads stale marks.
Costs: a mark is a tuple assignment; a rank makes at most three small store requests a second.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Callable

import torch.distributed as dist

from dsoft_dist.errors import HUNG_EXIT_CODE
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel.processes import attempt_prefix

log = get_logger(__name__)

# the phases of a mark, in the order a rank goes through them after finishing a step
PHASES = {
    "start": "building the run or loading its checkpoint",
    "verify": "verification",
    "save": "a checkpoint save",
    "data": "waiting for its next batch",
    "forward": "the backbone's forward",
    "head": "the head's forward and backward",
    "backward": "the backbone's backward",
    "update": "the optimizer update",
}
_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}
_NAMES = list(PHASES)
_KEY = "parallel.hang_timeout_minutes"
_SHOWN = 6  # groups of ranks ahead named in the message
_INSTANCES = [0]  # Watchdogs created in this process: part of the key prefix (module doc)

Mark = tuple  # (finished steps, micro-batch, phase index); larger is further along


def store_prefix(instance: int) -> str:
    """The watchdog's key prefix: under the torchrun attempt's (``processes.attempt_prefix``, as the process
    group's keys are), per Watchdog of this process."""
    return f"{attempt_prefix()}/watchdog/run-{instance}/"


def connect_store(timeout_s: float = 30.0) -> dist.Store:
    """A new client of the launcher's store (MASTER_ADDR:MASTER_PORT, the store the process group met in)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def _ranks(ranks: list[int]) -> str:
    """'rank 3', 'ranks 0-2, 5'."""
    spans, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def where(mark: Mark | None) -> str:
    """Where a mark says a rank is, in words: its last finished step and its phase."""
    if mark is None:
        return "without a mark: it stopped before its watchdog started"
    step, micro, phase = mark
    name = _NAMES[phase]
    if name == "start":
        return f"in 'start' ({PHASES[name]})"
    if phase <= _PHASE_INDEX["save"]:
        return f"with step {step} finished, in '{name}' ({PHASES[name]}) after it"
    micro_text = f", micro-batch {micro + 1}" if micro else ""
    return f"with step {step} finished, in '{name}' ({PHASES[name]}) of step {step + 1}{micro_text}"


def describe_hang(marks: list[Mark | None]) -> str:
    """Which ranks are behind, from every rank's mark (None: never published): those with no mark, else
    those with the lowest; 'no single rank is behind' when every rank has the same mark."""
    missing = [r for r, m in enumerate(marks) if m is None]
    low = min((m for m in marks if m is not None), default=None)
    behind = missing or [r for r, m in enumerate(marks) if m == low]
    if len(behind) == len(marks):
        return (f"no single rank is behind: every rank is at the same place, {where(None if missing else low)}; "
                "a collective or something they share (the storage during a save, the network) stalls them all")
    others: dict[Mark, list[int]] = {}
    lagging = set(behind)
    for r, m in enumerate(marks):
        if r not in lagging:
            others.setdefault(m, []).append(r)
    groups = sorted(others.items())
    ahead = "; ".join(f"{_ranks(rs)} {where(m)}" for m, rs in groups[:_SHOWN])
    if len(groups) > _SHOWN:
        ahead += f"; and {sum(len(rs) for _, rs in groups[_SHOWN:])} ranks elsewhere"
    one = len(behind) == 1
    return (f"{_ranks(behind)} {'is' if one else 'are'} behind, {where(None if missing else low)}; the other "
            f"ranks are further along, waiting for {'it' if one else 'them'}: {ahead}")


class Watchdog:
    """Marks of this rank's progress and the thread that detects a hung job (see the module doc).

    timeout_minutes 0 or a world of one rank: marks only, no thread. ``connect`` makes the thread's
    store client and ``exit`` ends the process (tests pass their own).
    """

    def __init__(self, rank: int, world_size: int, timeout_minutes: float, interval_s: float = 1.0,
                 connect: Callable[[], dist.Store] = connect_store, exit: Callable[[int], None] = os._exit):
        self.rank, self.world_size, self.timeout_minutes = rank, world_size, timeout_minutes
        self.timeout_s, self.interval_s = timeout_minutes * 60.0, interval_s
        self._mark: Mark = (0, 0, _PHASE_INDEX["start"])
        self._connect, self._exit = connect, exit
        self.enabled = world_size > 1 and timeout_minutes > 0
        _INSTANCES[0] += self.enabled  # every rank enables the same ones, in the same order
        self.prefix = store_prefix(_INSTANCES[0])
        self._published: Mark | None = None
        self._count: int | None = None  # the progress counter last read
        self._token, self._since = None, 0.0
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="dsoft-hang-watchdog", daemon=True) \
            if self.enabled else None
        if self._thread is not None:
            self._thread.start()

    def mark(self, phase: str, step: int | None = None, micro: int = 0) -> None:
        """This rank is now in ``phase`` (a key of PHASES) of micro-batch ``micro``; ``step`` (finished
        optimizer steps) stays as it was when not given. A plain assignment: call it anywhere."""
        self._mark = (self._mark[0] if step is None else step, micro, _PHASE_INDEX[phase])

    def exchange(self, store: dist.Store) -> int:
        """Publishes this rank's mark if it changed (and counts the progress counter up); returns the counter."""
        mark = self._mark
        if mark != self._published:
            store.set(f"mark/{self.rank}", " ".join(map(str, mark)))
            store.add("progress", 1)
            self._published = mark
        return store.add("progress", 0)

    def stalled(self, count: int | None, now: float) -> bool:
        """True when neither this rank's mark nor the progress counter (None: unknown, the last one read
        stands) changed for the timeout, on the clock ``now`` (seconds)."""
        self._count = self._count if count is None else count
        token = (self._mark, self._count)
        if token != self._token:
            self._token, self._since = token, now
            return False
        return now - self._since >= self.timeout_s

    def read_marks(self, store: dist.Store) -> list[Mark | None]:
        """Every rank's last published mark (None for a rank that published none)."""
        keys = [f"mark/{r}" for r in range(self.world_size)]
        return [tuple(int(v) for v in store.get(k).decode().split()) if store.check([k]) else None for k in keys]

    def report(self, store: dist.Store | None) -> str:
        """The error the ranks log on a hang: who is behind (``describe_hang``), what happens, what to do."""
        try:
            who = describe_hang(self.read_marks(store)) if store is not None else None
        except (RuntimeError, OSError) as err:  # the store went away: say so, with this rank's own mark
            store, who = None, f"the other ranks' marks cannot be read ({err})"
        if store is None:
            who = f"{who or 'the store cannot be reached'}; this rank {where(self._mark)}"
        return (f"no rank made progress for {self.timeout_s:g} s ({_KEY}={self.timeout_minutes:g}): {who}. Every "
                f"rank exits with code {HUNG_EXIT_CODE}; torchrun --max-restarts (launch/torchrun.sh, "
                "launch/multinode.sh) restarts the job, which resumes the run from its newest checkpoint "
                "(checkpoint.resume=auto), as the same command does. If a phase legitimately takes longer, raise "
                f"{_KEY} (below parallel.timeout_s; 0 switches the check off)")

    def _run(self) -> None:
        store = None
        while not self._stop.wait(self.interval_s):
            count = None
            try:
                if store is None:
                    store = dist.PrefixStore(self.prefix, self._connect())
                count = self.exchange(store)
            except (RuntimeError, OSError, ValueError, KeyError) as err:  # unreachable: own marks still count
                store = None
                self._warn_once(err)
            if self.stalled(count, time.monotonic()):
                self._fail(self.report(store))
                return

    def _warn_once(self, err: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("hang detection cannot reach the store at %s:%s (%s); it keeps trying, and this rank's "
                        "own progress keeps it from firing", os.environ.get("MASTER_ADDR", "?"),
                        os.environ.get("MASTER_PORT", "?"), err)

    def _fail(self, message: str) -> None:
        log.error(message)
        for handler in logging.getLogger("dsoft_dist").handlers:
            handler.flush()
        sys.stderr.flush()
        self._exit(HUNG_EXIT_CODE)

    def stop(self) -> None:
        """Ends the thread (waits up to 5 s for a store request it is in)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
