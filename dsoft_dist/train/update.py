"""One update: the k micro-batches of one optimizer step through the backbone and the head, then both optimizers.

    updater = Updater(engine, head, env, accum_steps=k)
    out = updater(batches, lr)  # pulls k (inputs, labels) micro-batches from the iterator
    out.loss, out.applied, out.timings   # {"data", "backbone", "head", "optimizer"} seconds

Per micro-batch (DESIGN.md §5, conventions in ``dsoft_dist.train.grads``):

    emb = engine.forward(x)                            # (B_local, D), autocast
    e = emb.detach().float().requires_grad_()          # the head runs in fp32, outside the engine
    (head(e, y) / k).backward()                        # head forward + backward (+ its step in backward)
    engine.backward(emb, e.grad * factor)              # backbone backward, the only scaled part

then ``engine.update(head)``: one overflow decision, clipping, both optimizers. The head's
backward runs on its own, so the update's time splits into data wait, backbone
(forward + backward), head (forward + backward, and the head's optimizer when it runs
inside backward) and optimizer. On CUDA the split synchronizes only on ``timed`` steps.

``watchdog`` (a ``dsoft_dist.parallel.watchdog.Watchdog``; the trainer passes its own) is told each
phase of each micro-batch (data, forward, head, backward) and the update, so that a rank blocked in one
is named with it; the step it is marked with is the trainer's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dsoft_dist.losses.functional import validate_labels
from dsoft_dist.parallel.watchdog import Watchdog
from dsoft_dist.train.grads import embedding_grad_factor


@dataclass
class UpdateOutput:
    """What one update produced (loss is a detached tensor: read it only when logging)."""

    loss: torch.Tensor
    applied: bool
    samples: int  # samples this rank consumed
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # the head's row means, averaged over the micro-batches

    def diagnostics_floats(self) -> dict[str, float]:
        """The diagnostics as floats (a host read: call it on logged steps only)."""
        return {k: float(v) for k, v in self.diagnostics.items() if k != "loss"}


class Updater:
    """Runs one update: ``accum_steps`` micro-batches, then the engine's update of both optimizers (module doc)."""

    def __init__(self, engine, head, env, accum_steps: int = 1, watchdog: Watchdog | None = None):
        self.engine, self.head, self.env, self.accum_steps = engine, head, env, accum_steps
        self.factor = embedding_grad_factor(env.world_size)
        self._checked = False
        self.watchdog = watchdog or Watchdog(env.rank, 1, 0.0)  # by default marks only, no thread

    def _clock(self, timed: bool) -> float:
        if timed and self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter()

    def __call__(self, batches: Iterator, lr: float, timed: bool = False) -> UpdateOutput:
        k, dev = self.accum_steps, self.env.device
        t = {"data": 0.0, "backbone": 0.0, "head": 0.0, "optimizer": 0.0}
        total, samples, diag = torch.zeros((), device=dev), 0, {}
        self.engine.set_lr(lr)
        mark = self.watchdog.mark
        for i in range(k):
            t0 = self._clock(timed)
            mark("data", micro=i)
            x, y = next(batches)
            if not self._checked:  # up front, naming the value and the fix; the head checks its first
                # forward across ranks, and from then on the loader's label checks and fixed batch size hold
                validate_labels(y, self.head.num_classes, where="labels of the first training batch", fix=(
                    "set data.num_classes to the data's class count (the manifest's num_classes), or fix the labels"))
                self._checked = True
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            t1 = self._clock(timed)
            with self.engine.accumulating(last=i == k - 1):
                mark("forward", micro=i)
                emb = self.engine.forward(x)  # (B_local, D)
                t2 = self._clock(timed)
                mark("head", micro=i)
                e = emb.detach().float().requires_grad_()
                loss = self.head(e, y) / k
                loss.backward()
                t3 = self._clock(timed)
                mark("backward", micro=i)
                self.engine.backward(emb, e.grad * self.factor)
            t4 = self._clock(timed)
            t["data"] += t1 - t0
            t["backbone"] += (t2 - t1) + (t4 - t3)
            t["head"] += t3 - t2
            total += loss.detach()
            samples += len(y)
            for key, v in self.head.last_stats.items():
                diag[key] = diag.get(key, 0.0) + v / k
        t5 = self._clock(timed)
        mark("update", micro=k - 1)
        applied = self.engine.update(self.head)
        t["optimizer"] = self._clock(timed) - t5
        return UpdateOutput(loss=total, applied=applied, samples=samples, timings=t, diagnostics=diag)
