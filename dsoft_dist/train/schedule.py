"""Learning-rate schedule: linear warmup, then the decay ``schedule.decay`` names (cosine, poly, constant),
each registered in ``dsoft_dist.registry.LR_SCHEDULES``.

    factor = lr_factor(step, cfg.schedule)     # multiply the base lr by it; step counts from 0
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.schedule))

A decay is ``decay(p, sched) -> factor`` of the progress p in [0, 1] after the warmup and the
``ScheduleConfig``; one of your own registers from a module named in the config's ``extra_modules``:
``LR_SCHEDULES.register("step", lambda p, sched: 0.1 if p > 0.5 else 1.0)``.
"""
from __future__ import annotations

import math

from dsoft_dist.registry import LR_SCHEDULES


def lr_factor(step: int, sched) -> float:
    """Factor in [min_lr_ratio, 1] for ``step`` under a ``ScheduleConfig``.

    warmup: (step + 1) / warmup_steps for step < warmup_steps; then with progress
    p = (step - warmup) / (steps - warmup) in [0, 1], the registered decay of ``sched.decay`` at p.
    """
    if step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    span = max(1, sched.steps - sched.warmup_steps)
    p = min(1.0, (step - sched.warmup_steps) / span)
    return LR_SCHEDULES.get(sched.decay)(p, sched)


@LR_SCHEDULES.register("cosine")
def cosine(p: float, sched) -> float:
    """m + (1 - m) (1 + cos(pi p)) / 2 with m = min_lr_ratio."""
    m = sched.min_lr_ratio
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


@LR_SCHEDULES.register("poly")
def poly(p: float, sched) -> float:
    """m + (1 - m) (1 - p)^poly_power with m = min_lr_ratio."""
    m = sched.min_lr_ratio
    return m + (1.0 - m) * (1.0 - p) ** sched.poly_power


@LR_SCHEDULES.register("constant")
def constant(p: float, sched) -> float:
    """1: the base lr after the warmup."""
    return 1.0


def inter_weight_at(step: int, head, sched) -> float:
    """D-Softmax's inter weight for ``step`` (from 0) under a ``HeadConfig`` and a ``ScheduleConfig``.

    ``head.inter_weight_end`` None: the constant ``head.inter_weight`` (the paper's form). Else the
    inter-weight schedule: w + (w_end - w) (1 - cos(pi p)) / 2 with p = step / (steps - 1), so the first
    step pushes negatives away with w and the last with w_end. The loss of each step is the paper's
    D-Softmax with that step's weight; the weight is a function of the step, so a resumed run matches.
    """
    if head.inter_weight_end is None:
        return head.inter_weight
    p = min(1.0, step / max(1, sched.steps - 1))
    return head.inter_weight + (head.inter_weight_end - head.inter_weight) * 0.5 * (1.0 - math.cos(math.pi * p))
