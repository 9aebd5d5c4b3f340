"""Preemption: a signal sets a flag, the ranks agree at the next step boundary, a checkpoint is written,
the process exits with ``PREEMPTED_EXIT_CODE``.

    preemption = Preemption(["SIGTERM", "SIGUSR1"])   # installs the handlers (main thread only)
    if preemption.received: ...                        # the trainer all-reduces it at each step boundary
    preemption.restore()                               # puts the previous handlers back

A rank never exits inside a collective: the handler only records the signal; the step
boundary's all-reduce makes every rank see it at the same step (Slurm's
``--signal=B:USR1@90`` reaches one process, torchrun forwards SIGTERM to all, ``dsoft train``
forwards what its local ranks' parent receives). Ctrl-C (SIGINT) is always one of the signals:
the first asks for the checkpoint like SIGTERM, a second one stops at once (KeyboardInterrupt).
"""
from __future__ import annotations

import os
import signal
import threading

from dsoft_dist.errors import PREEMPTED_EXIT_CODE
from dsoft_dist.observability import get_logger

log = get_logger(__name__)

class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class Preemption:
    """Signal handlers that record a preemption request (see the module doc)."""

    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._interrupts = 0
        self._previous: dict[int, object] = {}
        for name in [*names, "SIGINT"]:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.signals entry {name!r} is not a signal name on this system: use e.g. "
                                 "SIGTERM, SIGUSR1, SIGUSR2")
            if threading.current_thread() is threading.main_thread() and sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)  # signal.signal works there only

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if self.received is None and name == "SIGINT" and os.environ.get("RANK", "0") == "0":
            log.warning("Ctrl-C: a checkpoint is written after this step, then the run exits with code %d "
                        "(Ctrl-C again to stop at once, without it)", PREEMPTED_EXIT_CODE)
        self.received = self.received or name

    def restore(self) -> None:
        """Puts back the handlers the constructor replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
