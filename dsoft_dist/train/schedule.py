"""Learning-rate schedule: linear warmup, then cosine, polynomial or constant decay.

    factor = lr_factor(step, cfg.schedule)     # multiply the base lr by it; step counts from 0
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.schedule))
"""
from __future__ import annotations

import math


def lr_factor(step: int, sched) -> float:
    """Factor in [min_lr_ratio, 1] for ``step`` under a ``ScheduleConfig``.

    warmup: (step + 1) / warmup_steps for step < warmup_steps; then with progress
    p = (step - warmup) / (steps - warmup) in [0, 1]:
    cosine: m + (1 - m) (1 + cos(pi p)) / 2; poly: m + (1 - m) (1 - p)^power; constant: 1.
    """
    if step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    span = max(1, sched.steps - sched.warmup_steps)
    p = min(1.0, (step - sched.warmup_steps) / span)
    m = sched.min_lr_ratio
    if sched.decay == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    if sched.decay == "poly":
        return m + (1.0 - m) * (1.0 - p) ** sched.poly_power
    return 1.0
