"""Negative-set selection shared by every layer (reference losses, sharded head, kernels).

Modes (DESIGN.md §1):
- ``all``: every class except the row's own (returns None: no restriction).
- ``batch`` (D-Softmax-B): the classes present in the (global) batch.
- ``random`` (D-Softmax-K): K = ceil(r * C) classes drawn uniformly without
  replacement, fresh each step, seeded by (seed, step, rank).
- ``partial`` (Partial-FC-style sampled softmax): every positive class of the batch
  plus uniform random other classes up to K = max(ceil(r * C), #positives).

Selections are sorted int64 class-id tensors (shared by all rows); the target of a row
is excluded from its negatives by the loss, not here. Sampling costs O(K log K), not
O(C): no full permutation of millions of classes per step.

    idx = select_classes("random", labels, num_classes=10**6, sample_rate=1/64, seed=0, step=7)
    mask = class_mask(idx, labels.shape[0], num_classes)   # (B, C) bool, for the references
"""
from __future__ import annotations

import math

import torch

MODES = ("all", "batch", "random", "partial")

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 63) - 1


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit generator seed mixing (seed, step, rank) so nearby values do not collide."""
    value = 0
    for part in (seed, step, rank):
        value = ((value ^ (int(part) & _MASK64)) * _MIX + 0x632BE59BD9B4E019) & _MASK64
        value ^= value >> 29
    return value


def num_sampled(num_classes: int, sample_rate: float) -> int:
    """K = ceil(r * C), at least 1 and at most C."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} is invalid: must be in (0, 1]")
    return max(1, min(num_classes, math.ceil(sample_rate * num_classes - 1e-9)))


def sample_without_replacement(n: int, k: int, generator: torch.Generator,
                               exclude: torch.Tensor | None = None) -> torch.Tensor:
    """k distinct ints from [0, n) minus ``exclude``, uniform, sorted; O(k log k) when k << n.

    Uses rejection (draw, deduplicate, top up) while k is under half of what is
    available, and a permutation otherwise. ``exclude`` must be sorted unique int64.
    """
    exclude = exclude if exclude is not None else torch.empty(0, dtype=torch.int64)
    available = n - exclude.numel()
    if k > available:
        raise ValueError(f"cannot sample {k} distinct classes from {available} available")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * k > available:
        keep = torch.ones(n, dtype=torch.bool)
        keep[exclude] = False
        pool = keep.nonzero().squeeze(1)
        return pool[torch.randperm(available, generator=generator)[:k]].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(0, n, (2 * (k - chosen.numel()) + 16,), generator=generator)
        if exclude.numel():
            pos = torch.searchsorted(exclude, draw).clamp(max=exclude.numel() - 1)
            draw = draw[exclude[pos] != draw]
        # keep first occurrences in draw order so the result is a uniform k-subset
        merged = torch.cat([chosen, draw])
        uniq, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
        chosen = merged[first.sort().values][:k]
    return chosen.sort().values


def select_classes(mode: str, labels: torch.Tensor, num_classes: int, sample_rate: float = 1.0,
                   seed: int = 0, step: int = 0, rank: int = 0) -> torch.Tensor | None:
    """The negative class set for one step, as sorted int64 ids on labels' device (None = all).

    labels (B,) int64 of the (global) batch; -1 entries are ignored.
    """
    if mode not in MODES:
        raise ValueError(f"negatives={mode!r} is invalid; use one of {', '.join(MODES)}")
    if mode == "all":
        return None
    positives = torch.unique(labels[labels >= 0]).cpu()  # sorted
    if mode == "batch":
        return positives.to(labels.device)
    gen = torch.Generator().manual_seed(step_seed(seed, step, rank))
    k = num_sampled(num_classes, sample_rate)
    if mode == "random":
        idx = sample_without_replacement(num_classes, k, gen)
    else:  # partial: positives kept, random others up to k
        extra = max(0, k - positives.numel())
        idx = torch.cat([positives, sample_without_replacement(num_classes, extra, gen, exclude=positives)]).sort().values
    return idx.to(labels.device)


def select_shard_classes(mode: str, labels: torch.Tensor, class_start: int, num_local_classes: int,
                         sample_rate: float = 1.0, seed: int = 0, step: int = 0,
                         rank: int = 0) -> torch.Tensor | None:
    """One class shard's negative rows for a step: sorted LOCAL row ids on labels' device.

    The shard owns global classes [class_start, class_start + num_local_classes); labels
    (B_global,) are global ids. random/partial draw ceil(r * C_local) rows with a generator
    seeded by (seed, step, rank); batch keeps the shard's classes present in the batch.
    Concatenating ``class_start + ids`` over shards gives the step's global negative set,
    which a single process reproduces by calling this for every shard with the same seed.
    """
    if mode == "all":
        return None
    local = labels - class_start
    in_shard = (labels >= 0) & (local >= 0) & (local < num_local_classes)
    return select_classes(mode, torch.where(in_shard, local, torch.full_like(local, -1)),
                          num_local_classes, sample_rate, seed, step, rank)


def class_mask(classes: torch.Tensor | None, batch_size: int, num_classes: int,
               device: torch.device | None = None) -> torch.Tensor | None:
    """(B, C) bool mask with True in the selected columns (None stays None = all classes)."""
    if classes is None:
        return None
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device or classes.device)
    mask[classes] = True
    return mask[None, :].expand(batch_size, num_classes)
