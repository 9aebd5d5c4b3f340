"""Preemption: a signal sets a flag, the ranks agree at the next step boundary, a checkpoint is written,
the process exits with ``PREEMPTED_EXIT_CODE``.

    preemption = Preemption(["SIGTERM", "SIGUSR1"])   # installs the handlers (main thread only)
    if preemption.agreed(device): ...                  # collective, once per step: any rank's signal counts
    preemption.restore()                               # puts the previous handlers back

A rank never exits inside a collective: the handler only records the signal; the step
boundary's all-reduce makes every rank see it at the same step (Slurm's
``--signal=B:USR1@90`` reaches one process, torchrun forwards SIGTERM to all).
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from dsoft_dist.observability import get_logger

log = get_logger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a Slurm script requeues on it


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class Preemption:
    """Signal handlers that record a preemption request (see the module doc)."""

    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        for name in names:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.signals entry {name!r} is not a signal name on this system: use e.g. "
                                 "SIGTERM, SIGUSR1, SIGUSR2")
            if threading.current_thread() is threading.main_thread():  # signal.signal works there only
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a signal (one tiny all-reduce)."""
        flag = torch.tensor(1.0 if self.received else 0.0, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
