"""Negative-set selection shared by every layer (reference losses, sharded head, kernels).

Modes (DESIGN.md §1):
- ``all``: every class except the row's own (returns None: no restriction).
- ``batch`` (D-Softmax-B): the classes present in the (global) batch.
- ``random`` (D-Softmax-K): K = ceil(r * C) classes drawn uniformly without
  replacement, fresh each draw (each training-mode forward), seeded by (seed, draw, rank).
- ``partial`` (Partial-FC-style sampled softmax): every positive class of the batch
  plus uniform random other classes up to K = max(ceil(r * C), #positives).
- ``nearest`` (D-Softmax-KN, the sharded head only): the set of ``random``, and each row adds the
  nearest classes of its own class (a table of each class's nearest classes by the cosine of their
  weights), the random set's sum weighted to stand for the other classes (``dsoft_dist.head.nearest``).

Selections are sorted int64 class-id tensors (shared by all rows); the target of a row
is excluded from its negatives by the loss, not here. Sampling is host work (numpy) costing
O(K log K) while K < C / 50 (no permutation of millions of classes per step), a partial
shuffle of C above that (6 ms at C = 500k, K = 62.5k).

    idx = select_classes("random", labels, num_classes=10**6, sample_rate=1/64, seed=0, draw=7)
    mask = class_mask(idx, labels.shape[0], num_classes)   # (B, C) bool, for the references
"""
from __future__ import annotations

import math

import numpy as np
import torch

MODES = ("all", "batch", "random", "partial")  # a function of the labels, the seed and the draw
NEGATIVES = (*MODES, "nearest")  # the sharded head's: nearest also reads its table of nearest classes
# nearest's settings (the head's nearest_* arguments, the config's head.nearest_*), read by no other mode
NEAREST_DEFAULTS = {"nearest_per_class": 8, "nearest_refresh": 0}

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 63) - 1


def draw_seed(seed: int, draw: int, rank: int = 0) -> int:
    """A 63-bit generator seed mixing (seed, draw, rank) so nearby values do not collide."""
    value = 0
    for part in (seed, draw, rank):
        value = ((value ^ (int(part) & _MASK64)) * _MIX + 0x632BE59BD9B4E019) & _MASK64
        value ^= value >> 29
    return value


def num_sampled(num_classes: int, sample_rate: float) -> int:
    """K = ceil(r * C), at least 1 and at most C."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} is invalid: must be in (0, 1]")
    return max(1, min(num_classes, math.ceil(sample_rate * num_classes - 1e-9)))


def sample_without_replacement(n: int, k: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """k distinct ints from [0, n) minus ``exclude``, uniform, sorted int64 (CPU); O(k log k) when k < n / 50.

    Host work only (numpy's seeded generator, no torch op on step data), so a step on a GPU
    never waits for it. With ``exclude`` (sorted unique int64) it draws k + |exclude| distinct
    values in random order and keeps the first k that are not excluded: the first k of a
    uniformly random ordering of the available values, i.e. a uniform k-subset of them.
    """
    n_excluded = 0 if exclude is None else exclude.numel()
    available = n - n_excluded
    if k > available:
        raise ValueError(f"cannot sample {k} distinct classes from {available} available")
    rng = np.random.default_rng(seed)
    if not n_excluded:
        return torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False, shuffle=False)))
    draw = rng.choice(n, size=k + n_excluded, replace=False, shuffle=True)
    kept = draw[~np.isin(draw, exclude.numpy(), assume_unique=True)][:k]
    return torch.from_numpy(np.sort(kept))


def select_classes(mode: str, labels: torch.Tensor, num_classes: int, sample_rate: float = 1.0,
                   seed: int = 0, draw: int = 0, rank: int = 0) -> torch.Tensor | None:
    """The negative class set for one step, as sorted int64 ids on labels' device (None = all).

    labels (B,) int64 of the (global) batch; -1 entries are ignored.
    """
    if mode not in MODES:
        raise ValueError(f"negatives={mode!r} is invalid; use one of {', '.join(MODES)}")
    if mode == "all":
        return None
    k, gen_seed = num_sampled(num_classes, sample_rate), draw_seed(seed, draw, rank)
    if mode == "random":  # drawn on the host, independent of the labels: no device sync
        return _to_device(sample_without_replacement(num_classes, k, gen_seed), labels.device)
    # batch and partial depend on the batch's classes: reading them is one host sync per step
    positives = torch.unique(labels[labels >= 0]).cpu()  # sorted
    if mode == "batch":
        return positives.to(labels.device)
    extra = max(0, k - positives.numel())  # partial: positives kept, random others up to k
    idx = torch.cat([positives, sample_without_replacement(num_classes, extra, gen_seed, exclude=positives)])
    return idx.sort().values.to(labels.device)


def _to_device(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host-drawn ids on ``device``: through pinned memory on CUDA, so the copy does not block the host."""
    if device.type != "cuda":
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


def select_shard_classes(mode: str, labels: torch.Tensor, class_start: int, num_local_classes: int,
                         sample_rate: float = 1.0, seed: int = 0, draw: int = 0,
                         rank: int = 0) -> torch.Tensor | None:
    """One class shard's negative rows for a step: sorted LOCAL row ids on labels' device.

    The shard owns global classes [class_start, class_start + num_local_classes); labels
    (B_global,) are global ids. random/partial draw ceil(r * C_local) rows with a generator
    seeded by (seed, draw, rank); batch keeps the shard's classes present in the batch.
    Concatenating ``class_start + ids`` over shards gives the step's global negative set,
    which a single process reproduces by calling this for every shard with the same seed.
    """
    if mode == "all":
        return None
    local = labels - class_start
    in_shard = (labels >= 0) & (local >= 0) & (local < num_local_classes)
    return select_classes(mode, torch.where(in_shard, local, torch.full_like(local, -1)),
                          num_local_classes, sample_rate, seed, draw, rank)


def class_mask(classes: torch.Tensor | None, batch_size: int, num_classes: int,
               device: torch.device | None = None) -> torch.Tensor | None:
    """(B, C) bool mask with True in the selected columns (None stays None = all classes)."""
    if classes is None:
        return None
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device or classes.device)
    mask[classes] = True
    return mask[None, :].expand(batch_size, num_classes)
