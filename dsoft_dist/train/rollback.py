"""Divergence roll-back: when the loss turns non-finite, or jumps past ``divergence.factor`` times its running
median, for ``divergence.steps`` optimizer steps in a row on any rank, every rank goes back to the newest
checkpoint written before the first of those steps, the data goes on after the window that led there, and
training continues (with the learning rate times ``divergence.lr_scale`` per roll-back); after
``divergence.max_rollbacks`` roll-backs the next divergence stops the run.

    guard = DivergenceGuard(cfg.divergence, state)   # state: the TrainState (window, streak, roll-backs)
    local = guard.local(loss)        # on device, no host read: [this rank's verdict, its loss]
    ...                              # all-reduced with the step boundary's flags (one collective per step)
    due = guard.observe(bad_ranks, loss_sum / world_size)   # True: roll back now (``Trainer._roll_back``)

The verdict of a step is one all-reduce, so every rank counts the same streak and rolls back together. The
running median is over the mean loss (over ranks) of the last ``divergence.window`` steps that were not
diverged; it lives in the TrainState, so a resumed run (on any number of ranks) decides as the undisturbed
one would. A checkpoint written during the streak is not a roll-back target: ``Checkpointer.roll_back_to``
takes the newest one before it and discards the later ones (the abandoned stretch of the run).
"""
from __future__ import annotations

import statistics

import torch

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


class DivergenceGuard:
    """Counts diverged steps (see the module doc); ``enabled`` False (``divergence.max_rollbacks`` = 0): the
    loss is not looked at and a run behaves as it did before roll-backs existed."""

    def __init__(self, cfg, state):
        self.cfg, self.state = cfg, state
        self.enabled = cfg.max_rollbacks > 0

    def threshold(self) -> float:
        """The loss above which a step is diverged: factor x the running median once the window is full."""
        window = self.state.losses
        if self.cfg.factor <= 0 or len(window) < self.cfg.window:
            return float("inf")
        return self.cfg.factor * statistics.median(window)

    def local(self, loss: torch.Tensor) -> torch.Tensor:
        """[1 when this rank's loss is diverged else 0, the loss (0 when not finite)] as a float64 device tensor."""
        loss = loss.detach().double().reshape(())
        bad = ~torch.isfinite(loss) | (loss > self.threshold())
        return torch.stack([bad.double(), torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)])

    def observe(self, bad_ranks: float, mean_loss: float) -> bool:
        """One step's agreed verdict: a diverged step lengthens the streak; a good one ends it and joins the
        window. True when the streak reached ``divergence.steps`` (roll back now)."""
        s = self.state
        if bad_ranks > 0:
            s.diverged_in_a_row += 1
            return s.diverged_in_a_row >= self.cfg.steps
        s.diverged_in_a_row = 0
        s.losses = (s.losses + [mean_loss])[-self.cfg.window:]
        return False

    def first_diverged_step(self) -> int:
        """The first step of the streak that triggered the roll-back."""
        return self.state.step - self.state.diverged_in_a_row + 1

    def stop_message(self, root: str) -> str | None:
        """Why the run stops instead of rolling back (the roll-backs are used up), or None."""
        s, c = self.state, self.cfg
        if s.rollbacks < c.max_rollbacks:
            return None
        return (f"the loss diverged at steps {self.first_diverged_step()}-{s.step} ({self._what()}) after "
                f"{s.rollbacks} roll-back(s), divergence.max_rollbacks={c.max_rollbacks}: the run stops. The "
                f"checkpoints in {root} are from before the divergence. Lower optimizer.lr (or set "
                "divergence.lr_scale < 1), check the data, use parallel.precision=bf16 or optimizer.grad_clip, or "
                "raise divergence.max_rollbacks")

    def no_target_message(self, root: str) -> str:
        """Why the run stops when no checkpoint in ``root`` is from before the diverged steps."""
        first = self.first_diverged_step()
        return (f"the loss diverged at steps {first}-{self.state.step} and no checkpoint from before step {first} is "
                f"in {root} to roll back to: the run stops. Save checkpoints earlier (checkpoint.every_steps), lower "
                "optimizer.lr, or check the data")

    def _what(self) -> str:
        c = self.cfg
        return ("a non-finite loss" if c.factor <= 0 else
                f"a non-finite loss or one above {c.factor:g}x the median of the last {c.window} steps") + \
            f" on some rank for {c.steps} steps in a row"

    def rolled_back(self, target_step: int, diverged_from: int, diverged_to: int, root: str) -> str:
        """After the load: counts the roll-back, scales the learning rate; returns the message to log."""
        s, c = self.state, self.cfg
        s.rollbacks += 1
        s.lr_scale *= c.lr_scale
        lr = f"; the learning rate is now x{s.lr_scale:g}" if c.lr_scale != 1.0 else ""
        return (f"the loss diverged at steps {diverged_from}-{diverged_to} ({self._what()}): rolled back to the "
                f"checkpoint of step {target_step} in {root} (roll-back {s.rollbacks} of at most "
                f"{c.max_rollbacks}); the data of steps {target_step + 1}-{diverged_to} is skipped{lr}")
