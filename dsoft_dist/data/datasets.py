"""Per-worker streams: IterableDatasets that yield small uint8 batches plus counters.

Each dataset is built for one (rank, world_size, epoch, pass) and reads its DataLoader
worker id itself, so the split is explicit and nothing touches torch.distributed.
Every item is a ``Chunk(images, labels, ids, keys, stats)``:

- images: (b, H, W, 3) uint8 (image modes) or (b, D) float32 (vector mode), b <= chunk;
- labels: (b,) int64;
- ids: (b,) int64 sample ids (``dsoft_dist.data.position``; -1 for shards without counts);
- keys: the samples' keys (the tar's ``__key__``; ``identity-index`` for synthetic
  samples) when the stream was built with ``keys=True``, else None;
- stats: {"worker": w, "samples": n so far, "bad": {kind: n so far}} for this worker (shards
  also give "events": every damaged shard read so far, ``BadData.events``), plus "error" when the
  fail policy stopped it (``raise_if_failed`` re-raises it: a
  worker never dies on bad data, so shutdown stays clean and the message stays short).

A stream built with a done mask (``done=``) reads only the epoch's remaining samples,
cut over the slots as if they were the whole epoch (a resume on another world size).

A worker always ends with an empty item carrying its final stats, so the main process
(``dsoft_dist.data.pipeline.TrainLoader``) sees every counter even from a worker that
had nothing to deliver. Images stay uint8 across the worker pipe (4x less IPC than
float); the main process normalizes.

    python -c "from dsoft_dist.data.datasets import SyntheticImageStream as S; print(next(iter(S(10, 2, 32, chunk=4))).images.shape)"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dsoft_dist.data.decode import Augment, BadSample, decode_sample, decode_vector
from dsoft_dist.data.glyphs import GlyphIdentities
from dsoft_dist.data.position import count_done, is_done
from dsoft_dist.data.rng import FeistelPermutation, hash_keys
from dsoft_dist.data.shards import BadData, assign_samples, iter_plan, shuffle_buffer
from dsoft_dist.data.synthetic import SyntheticIdentities, SyntheticVectors
from dsoft_dist.errors import BadDataError


@dataclass(frozen=True)
class Slot:
    """Where a stream runs: rank of world_size, epoch, pass (0, then 1, 2... for top-ups)."""

    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    seed: int = 0
    pass_index: int = 0


class Chunk(NamedTuple):
    """One worker item (see the module doc)."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    keys: list | None
    stats: dict


def raise_if_failed(stats: dict) -> None:
    """Re-raises, in the consuming process, a BadDataError a worker reported in its stats."""
    if "error" in stats:
        raise BadDataError(stats["error"])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _chunks(samples: Iterator, chunk: int, stats: dict, to_tensor, keys: bool) -> Iterator[Chunk]:
    """Groups (x, label, id, key) samples into Chunks of <= chunk samples."""
    xs, ys, ids, ks = [], [], [], []

    def item():
        return Chunk(to_tensor(xs), torch.tensor(ys, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64),
                     list(ks) if keys else None, dict(stats))

    for x, y, i, k in samples:
        xs.append(x)
        ys.append(y)
        ids.append(i)
        ks.append(k)
        stats["samples"] += 1
        if len(xs) == chunk:
            yield item()
            xs, ys, ids, ks = [], [], [], []
    if xs:
        yield item()


def _last(empty: torch.Tensor, stats: dict, keys: bool) -> Chunk:
    """The closing item of a worker: no samples, its final stats."""
    return Chunk(empty, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                 [] if keys else None, dict(stats))


def _stack_u8(xs: list) -> torch.Tensor:
    return torch.from_numpy(np.stack(xs))  # (b, H, W, 3) uint8


def _stack_f32(xs: list) -> torch.Tensor:
    return torch.from_numpy(np.stack(xs))  # (b, D) float32


def _empty(image_size: int) -> torch.Tensor:
    return torch.empty((0, image_size, image_size, 3), dtype=torch.uint8)


class ShardStream(IterableDataset):
    """WebDataset shards -> decoded, augmented uint8 image chunks for one slot (see module doc), or
    float32 (b, D) chunks of feature vectors when ``vector_dim`` > 0 (``dsoft_dist.data.vectors``)."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int] | None, num_classes: int, image_size: int,
                 slot: Slot = Slot(), chunk: int = 64, shuffle_buffer_size: int = 1000, shard_shuffle: bool = True,
                 augment: Augment | None = None, policy: str = "skip", use_fast_jpeg: bool = True,
                 done: np.ndarray | None = None, keys: bool = False, vector_dim: int = 0):
        super().__init__()
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(urls)} shard URLs but {len(counts)} per-shard counts: the shard list and the "
                             "manifest must describe the same shards in the same order")
        self.urls, self.counts = list(urls), None if counts is None else list(counts)
        self.num_classes, self.image_size, self.slot, self.chunk = num_classes, image_size, slot, chunk
        self.shuffle_buffer_size, self.shard_shuffle = shuffle_buffer_size, shard_shuffle
        self.augment, self.policy, self.use_fast_jpeg = augment, policy, use_fast_jpeg
        self.done, self.keys, self.vector_dim = done, keys, vector_dim

    def plan(self, worker: int, num_workers: int):
        s = self.slot
        counts = len(self.urls) if self.counts is None else self.counts
        return assign_samples(counts, s.rank, s.world_size, worker, num_workers,
                              epoch=s.epoch * 1000 + s.pass_index, seed=s.seed, shuffle=self.shard_shuffle,
                              done=self.done)

    def __iter__(self):
        worker, num_workers = _worker()
        s = self.slot
        # a damaged shard is warned about by the loader, with the rank's running count (stats["events"])
        bad = BadData(self.policy, where=f"[rank {s.rank} worker {worker}] ", log_shards=False)
        rng = np.random.default_rng([s.seed, s.epoch, s.pass_index, s.rank, worker, 7])
        samples = iter_plan(self.urls, self.plan(worker, num_workers), bad, self.counts, self.done)
        raw = shuffle_buffer(samples, self.shuffle_buffer_size, rng)
        stats = {"worker": worker, "samples": 0, "bad": bad.counts, "events": bad.events}
        vectors = self.vector_dim > 0
        try:
            yield from _chunks(self._decoded(raw, bad, rng), self.chunk, stats, _stack_f32 if vectors else _stack_u8,
                               self.keys)
        except BadDataError as exc:  # fail policy: hand the message over instead of crashing the worker
            stats["error"] = str(exc)
        yield _last(torch.empty((0, self.vector_dim)) if vectors else _empty(self.image_size), stats, self.keys)

    def _decoded(self, raw: Iterator[dict], bad: BadData, rng: np.random.Generator):
        """(image or vector, label, id, key) per good sample; bad ones are reported to ``bad``."""
        for sample in raw:
            try:
                if self.vector_dim:
                    x, label = decode_vector(sample, self.num_classes, self.vector_dim)
                else:
                    x, label = decode_sample(sample, self.num_classes, self.image_size, self.use_fast_jpeg)
                    x = self.augment(x, rng) if self.augment else x
            except BadSample as exc:
                bad.report(exc.kind, f"{sample.get('__url__')} #{sample.get('__index__')}: {exc}")
                continue
            yield x, label, sample["__id__"], sample["__key__"]


def synthetic_positions(total: int, slot: Slot, worker: int, num_workers: int, shuffle: bool = True,
                        block: int = 4096, done: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The slot's sample ids in [0, total) for this epoch, in blocks (O(block) memory): a
    contiguous range of a seeded permutation, cut like assign_samples (rank ranges, then
    worker ranges). With a done mask the cut is made over the permutation's remaining ids."""
    left = total if done is None else total - count_done(done)
    r0, r1 = left * slot.rank // slot.world_size, left * (slot.rank + 1) // slot.world_size
    lo, hi = r0 + (r1 - r0) * worker // num_workers, r0 + (r1 - r0) * (worker + 1) // num_workers
    perm = FeistelPermutation(total, int(hash_keys(slot.seed, slot.epoch, slot.pass_index, 211))) if shuffle else None
    if done is None:
        for start in range(lo, hi, block):
            positions = np.arange(start, min(hi, start + block), dtype=np.int64)
            yield positions if perm is None else perm(positions)
        return
    seen = 0  # remaining ids before this block, in epoch order
    for start in range(0, total, block):
        if seen >= hi:
            return
        ids = np.arange(start, min(total, start + block), dtype=np.int64)
        ids = ids if perm is None else perm(ids)
        ids = ids[~is_done(done, ids)]
        a, b = max(lo, seen) - seen, min(hi, seen + len(ids)) - seen
        if a < b:
            yield ids[a:b]
        seen += len(ids)


class SyntheticImageStream(IterableDataset):
    """num_classes x samples_per_class synthetic images per epoch, split like shards: face-like identities
    (``SyntheticIdentities``), or glyph identities (``GlyphIdentities``) with ``glyphs=True``."""

    def __init__(self, num_classes: int, samples_per_class: int, image_size: int, slot: Slot = Slot(),
                 chunk: int = 64, difficulty="medium", augment: Augment | None = None, identity_offset: int = 0,
                 done: np.ndarray | None = None, keys: bool = False, glyphs: bool = False):
        super().__init__()
        source = GlyphIdentities if glyphs else SyntheticIdentities
        self.source = source(num_classes, image_size=image_size, seed=slot.seed, identity_offset=identity_offset,
                             difficulty=difficulty)
        self.samples_per_class, self.slot, self.chunk, self.augment = samples_per_class, slot, chunk, augment
        self.done, self.keys = done, keys

    def __iter__(self):
        worker, num_workers = _worker()
        total = self.source.num_identities * self.samples_per_class
        rng = np.random.default_rng([self.slot.seed, self.slot.epoch, self.slot.pass_index, self.slot.rank, worker, 9])

        def samples():
            for positions in synthetic_positions(total, self.slot, worker, num_workers, done=self.done):
                for p in positions.tolist():
                    identity, index = divmod(p, self.samples_per_class)
                    img = self.source.sample(identity, index)
                    yield (self.augment(img, rng) if self.augment else img), identity, p, f"{identity}-{index}"

        stats = {"worker": worker, "samples": 0, "bad": {}}
        yield from _chunks(samples(), self.chunk, stats, _stack_u8, self.keys)
        yield _last(_empty(self.source.image_size), stats, self.keys)


class SyntheticVectorStream(IterableDataset):
    """Vector-mode identities, generated a whole chunk at a time (cheap for millions of classes)."""

    def __init__(self, num_classes: int, samples_per_class: int, dim: int, slot: Slot = Slot(), chunk: int = 256,
                 identity_offset: int = 0, done: np.ndarray | None = None, keys: bool = False, **vector_kwargs):
        super().__init__()
        self.source = SyntheticVectors(num_classes, dim=dim, seed=slot.seed, identity_offset=identity_offset,
                                       **vector_kwargs)
        self.samples_per_class, self.slot, self.chunk = samples_per_class, slot, chunk
        self.done, self.keys = done, keys

    def __iter__(self):
        worker, num_workers = _worker()
        total = self.source.num_identities * self.samples_per_class
        stats = {"worker": worker, "samples": 0, "bad": {}}
        for ids in synthetic_positions(total, self.slot, worker, num_workers, block=self.chunk, done=self.done):
            identity, index = np.divmod(ids, self.samples_per_class)
            stats["samples"] += len(ids)
            keys = [f"{i}-{j}" for i, j in zip(identity.tolist(), index.tolist())] if self.keys else None
            yield Chunk(torch.from_numpy(self.source.batch(identity, index)), torch.from_numpy(identity),
                        torch.from_numpy(ids), keys, dict(stats))
        yield _last(torch.empty((0, self.source.dim)), stats, self.keys)
