"""Per-worker streams: IterableDatasets that yield small uint8 batches plus counters.

Each dataset is built for one (rank, world_size, epoch, pass) and reads its DataLoader
worker id itself, so the split is explicit and nothing touches torch.distributed.
Every item is ``(images, labels, stats)``:

- images: (b, H, W, 3) uint8 (image modes) or (b, D) float32 (vector mode), b <= chunk;
- labels: (b,) int64;
- stats: {"worker": w, "samples": n so far, "bad": {kind: n so far}} for this worker,
  plus "error" when the fail policy stopped it (``raise_if_failed`` re-raises it: a
  worker never dies on bad data, so shutdown stays clean and the message stays short).

A worker always ends with an empty item carrying its final stats, so the main process
(``dsoft_dist.data.pipeline.TrainLoader``) sees every counter even from a worker that
had nothing to deliver. Images stay uint8 across the worker pipe (4x less IPC than
float); the main process normalizes.

    python -c "from dsoft_dist.data.datasets import SyntheticImageStream as S; print(next(iter(S(10, 2, 32, chunk=4)))[0].shape)"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dsoft_dist.data.decode import Augment, BadSample, decode_sample
from dsoft_dist.data.rng import FeistelPermutation, hash_keys
from dsoft_dist.data.shards import BadData, BadDataError, assign_samples, iter_plan, shuffle_buffer
from dsoft_dist.data.synthetic import SyntheticIdentities, SyntheticVectors


@dataclass(frozen=True)
class Slot:
    """Where a stream runs: rank of world_size, epoch, pass (0, then 1, 2... for top-ups)."""

    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    seed: int = 0
    pass_index: int = 0


def raise_if_failed(stats: dict) -> None:
    """Re-raises, in the consuming process, a BadDataError a worker reported in its stats."""
    if "error" in stats:
        raise BadDataError(stats["error"])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _chunks(samples: Iterator, chunk: int, stats: dict, to_tensor) -> Iterator:
    """Groups (x, label) pairs into (images, labels, stats) items of <= chunk samples."""
    xs, ys = [], []
    for x, y in samples:
        xs.append(x)
        ys.append(y)
        stats["samples"] += 1
        if len(xs) == chunk:
            yield to_tensor(xs), torch.tensor(ys, dtype=torch.int64), dict(stats)
            xs, ys = [], []
    if xs:
        yield to_tensor(xs), torch.tensor(ys, dtype=torch.int64), dict(stats)


def _stack_u8(xs: list) -> torch.Tensor:
    return torch.from_numpy(np.stack(xs))  # (b, H, W, 3) uint8


def _empty(image_size: int) -> torch.Tensor:
    return torch.empty((0, image_size, image_size, 3), dtype=torch.uint8)


class ShardStream(IterableDataset):
    """WebDataset shards -> decoded, augmented uint8 chunks for one slot (see module doc)."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int] | None, num_classes: int, image_size: int,
                 slot: Slot = Slot(), chunk: int = 64, shuffle_buffer_size: int = 1000, shard_shuffle: bool = True,
                 augment: Augment | None = None, policy: str = "skip", use_fast_jpeg: bool = True):
        super().__init__()
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(urls)} shard URLs but {len(counts)} per-shard counts: the shard list and the "
                             "manifest must describe the same shards in the same order")
        self.urls, self.counts = list(urls), None if counts is None else list(counts)
        self.num_classes, self.image_size, self.slot, self.chunk = num_classes, image_size, slot, chunk
        self.shuffle_buffer_size, self.shard_shuffle = shuffle_buffer_size, shard_shuffle
        self.augment, self.policy, self.use_fast_jpeg = augment, policy, use_fast_jpeg

    def plan(self, worker: int, num_workers: int):
        s = self.slot
        counts = len(self.urls) if self.counts is None else self.counts
        return assign_samples(counts, s.rank, s.world_size, worker, num_workers,
                              epoch=s.epoch * 1000 + s.pass_index, seed=s.seed, shuffle=self.shard_shuffle)

    def __iter__(self):
        worker, num_workers = _worker()
        s = self.slot
        bad = BadData(self.policy, where=f"[rank {s.rank} worker {worker}] ")
        rng = np.random.default_rng([s.seed, s.epoch, s.pass_index, s.rank, worker, 7])
        raw = shuffle_buffer(iter_plan(self.urls, self.plan(worker, num_workers), bad), self.shuffle_buffer_size, rng)
        stats = {"worker": worker, "samples": 0, "bad": bad.counts}
        try:
            yield from _chunks(self._decoded(raw, bad, rng), self.chunk, stats, _stack_u8)
        except BadDataError as exc:  # fail policy: hand the message over instead of crashing the worker
            stats["error"] = str(exc)
        yield _empty(self.image_size), torch.empty(0, dtype=torch.int64), dict(stats)

    def _decoded(self, raw: Iterator[dict], bad: BadData, rng: np.random.Generator):
        for sample in raw:
            try:
                img, label = decode_sample(sample, self.num_classes, self.image_size, self.use_fast_jpeg)
            except BadSample as exc:
                bad.report(exc.kind, f"{sample.get('__url__')} #{sample.get('__index__')}: {exc}")
                continue
            yield (self.augment(img, rng) if self.augment else img), label


def synthetic_positions(total: int, slot: Slot, worker: int, num_workers: int, shuffle: bool = True,
                        block: int = 4096) -> Iterator[np.ndarray]:
    """The slot's sample numbers in [0, total) for this epoch, in blocks (O(block) memory):
    a contiguous range of a seeded permutation, cut like assign_samples (rank ranges,
    then worker ranges)."""
    r0, r1 = total * slot.rank // slot.world_size, total * (slot.rank + 1) // slot.world_size
    lo, hi = r0 + (r1 - r0) * worker // num_workers, r0 + (r1 - r0) * (worker + 1) // num_workers
    perm = FeistelPermutation(total, int(hash_keys(slot.seed, slot.epoch, slot.pass_index, 211))) if shuffle else None
    for start in range(lo, hi, block):
        positions = np.arange(start, min(hi, start + block), dtype=np.int64)
        yield positions if perm is None else perm(positions)


class SyntheticImageStream(IterableDataset):
    """num_classes x samples_per_class synthetic images per epoch, split like shards."""

    def __init__(self, num_classes: int, samples_per_class: int, image_size: int, slot: Slot = Slot(),
                 chunk: int = 64, difficulty="medium", augment: Augment | None = None, identity_offset: int = 0):
        super().__init__()
        self.source = SyntheticIdentities(num_classes, image_size=image_size, seed=slot.seed,
                                          identity_offset=identity_offset, difficulty=difficulty)
        self.samples_per_class, self.slot, self.chunk, self.augment = samples_per_class, slot, chunk, augment

    def __iter__(self):
        worker, num_workers = _worker()
        total = self.source.num_identities * self.samples_per_class
        rng = np.random.default_rng([self.slot.seed, self.slot.epoch, self.slot.pass_index, self.slot.rank, worker, 9])

        def samples():
            for positions in synthetic_positions(total, self.slot, worker, num_workers):
                for p in positions.tolist():
                    identity, index = divmod(p, self.samples_per_class)
                    img = self.source.sample(identity, index)
                    yield (self.augment(img, rng) if self.augment else img), identity

        stats = {"worker": worker, "samples": 0, "bad": {}}
        yield from _chunks(samples(), self.chunk, stats, _stack_u8)
        yield _empty(self.source.image_size), torch.empty(0, dtype=torch.int64), dict(stats)


class SyntheticVectorStream(IterableDataset):
    """Vector-mode identities, generated a whole chunk at a time (cheap for millions of classes)."""

    def __init__(self, num_classes: int, samples_per_class: int, dim: int, slot: Slot = Slot(), chunk: int = 256,
                 identity_offset: int = 0, **vector_kwargs):
        super().__init__()
        self.source = SyntheticVectors(num_classes, dim=dim, seed=slot.seed, identity_offset=identity_offset,
                                       **vector_kwargs)
        self.samples_per_class, self.slot, self.chunk = samples_per_class, slot, chunk

    def __iter__(self):
        worker, num_workers = _worker()
        total = self.source.num_identities * self.samples_per_class
        done = 0
        for positions in synthetic_positions(total, self.slot, worker, num_workers, block=self.chunk):
            identity, index = np.divmod(positions, self.samples_per_class)
            done += len(identity)
            stats = {"worker": worker, "samples": done, "bad": {}}
            yield torch.from_numpy(self.source.batch(identity, index)), torch.from_numpy(identity), stats
        yield torch.empty((0, self.source.dim)), torch.empty(0, dtype=torch.int64), \
            {"worker": worker, "samples": done, "bad": {}}
