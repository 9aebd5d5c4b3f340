"""The training loader: exactly ``batches_per_epoch`` normalized batches on every rank.

``build_train_loader(data_cfg, rank, world_size, epoch)`` is what the trainer calls
(under torchrun, with rank/world_size passed explicitly). It returns a ``TrainLoader``:

    for images, labels in loader:      # images (B, 3, H, W) float32 in [-1, 1]
        ...                            # labels (B,) int64; vectors (synthetic or shards): (B, D)
    loader.counters                    # {"samples", "padded", "bad": {kind: n}, "bad_total", "bad_shards"}
    loader.state_dict()                # {"epoch", "seed", "step", "steps_per_epoch", ...}: batch, batches_per_epoch

Sources (``dsoft_dist.data.sources``, registered under ``data.source``): ``synthetic`` (procedural
identities, images or vectors; no files) or ``webdataset`` (shards + the converters' manifest; image or
feature-vector samples, as the manifest's ``sample_kind`` says). Every source shares the batching below.
Every rank gets the same ``batches_per_epoch`` = floor(floor(N / world_size) / batch_size), N = samples
per epoch (or ``data.steps_per_epoch`` when set), so no rank runs out first. Worker chunks are
re-batched in the main process to exactly batch_size. If bad data leaves a rank short, it tops up from
a reshuffled second pass of its own part (counted as ``padded``) instead of stopping early.
A shard that cannot be read, or breaks off, while the epoch reads it (removed, cut, replaced) is
skipped: its lost samples are counted as bad (``dsoft_dist.data.shards.BadData``) and the loader warns
once per shard with the rank's running count. The epoch's accounting, per rank: when its pass read
its part to the end (always so when bad data left it short), ``samples + bad_total`` = its part of
the epoch, and ``batches_per_epoch * batch_size`` <= ``samples + padded`` (a chunk's unused rest).

Resume: ``build_train_loader(..., start_batch=k)`` replays the epoch's data pipeline and
drops the first k batches (data work only), so the (epoch, seed, batch) position in a
checkpoint restores the exact batch sequence. On another world size or batch size,
``build_train_loader(..., done=mask)`` reads only the samples the epoch has left, cut
afresh over the new ranks (``dsoft_dist.data.position``); the loader's ``consumed`` mask
(its ``done`` plus every batch it went through) is what a checkpoint saves for that.

    python -c "from dsoft_dist.config.schema import DataConfig as D; from dsoft_dist.data import build_train_loader as b
    print(len(b(D(num_classes=8, samples_per_class=4, image_size=32, batch_size=4, num_workers=0), 0, 1, 0)))"
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dsoft_dist.data.datasets import raise_if_failed
from dsoft_dist.data.decode import normalize_images
from dsoft_dist.data.manifest import MANIFEST_NAME, check_num_classes, load_manifest
from dsoft_dist.data.position import mark, new_mask, to_tensor
from dsoft_dist.data.rng import hash_keys
from dsoft_dist.data.shards import check_local_shards, expand_shards
from dsoft_dist.observability import get_logger
from dsoft_dist.registry import DATA_SOURCES

log = get_logger(__name__)
_MAX_PASSES = 8


class TrainLoader:
    """Fixed-length epoch over per-worker streams (see module doc). ``len(loader)`` = batches_per_epoch;
    ``batch`` = the batches of the epoch handed out so far (replayed ones included)."""

    def __init__(self, make_stream: Callable[[int], IterableDataset], batches_per_epoch: int, batch_size: int,
                 num_workers: int, rank: int, world_size: int, epoch: int, seed: int,
                 normalize: bool = True, start_batch: int = 0, num_samples: int | None = None,
                 done: np.ndarray | None = None, keys: bool = False):
        if batches_per_epoch < 1 and done is None:
            raise ValueError(f"batches_per_epoch={batches_per_epoch}: the data gives no full batch per rank; "
                             "lower data.batch_size or use more data")
        if not 0 <= start_batch <= max(batches_per_epoch, 0):
            raise ValueError(f"start_batch={start_batch} is outside [0, batches_per_epoch={batches_per_epoch}]")
        self.make_stream, self.batches_per_epoch, self.batch_size = make_stream, max(batches_per_epoch, 0), batch_size
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.epoch, self.seed, self.normalize, self.start_batch = epoch, seed, normalize, start_batch
        self.num_samples, self.done, self.keys = num_samples, done, keys
        self.batch = start_batch
        self.bad_before = 0  # this rank's bad samples before this epoch (TrainData sets it): the running count
        self._stats: dict[tuple[int, int], dict] = {}
        self._warned: dict[int, int] = {}  # per worker: the damaged shards of its stats already warned about
        self.padded = 0
        self.consumed = self._fresh_consumed()
        self.batch_keys: list[list[str]] = []  # keys of the batches handed out (keys=True), for the caller to take

    def _fresh_consumed(self) -> np.ndarray | None:
        if self.num_samples is None:
            return None
        return new_mask(self.num_samples) if self.done is None else self.done.copy()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _chunks(self) -> Iterator:
        """Worker Chunks from pass 0, then from top-up passes while more are needed."""
        for pass_index in range(_MAX_PASSES):
            stream = self.make_stream(pass_index)
            # its own generator: a DataLoader iterator otherwise draws its base seed from the global torch
            # RNG, so starting an epoch (or resuming mid-epoch) would shift the model's dropout draws
            gen = torch.Generator().manual_seed(int(hash_keys(self.seed, self.epoch, pass_index, self.rank, 307)))
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                prefetch_factor=4 if self.num_workers else None, generator=gen)
            for chunk in loader:
                raise_if_failed(chunk.stats)
                self._stats[(pass_index, chunk.stats["worker"])] = chunk.stats
                if not pass_index:  # a top-up pass re-reads the same shards
                    self._warn_shards(chunk.stats)
                if len(chunk.labels):
                    if pass_index:
                        self.padded += len(chunk.labels)
                    yield chunk
            log.warning("rank %d ran out of data at batch %d of %d (epoch %d; bad data skipped: %s): topping up "
                        "from pass %d of its shards", self.rank, self.batch, self.batches_per_epoch, self.epoch,
                        self.counters["bad"], pass_index + 1)
        raise RuntimeError(f"rank {self.rank} could not fill {self.batches_per_epoch} batches in {_MAX_PASSES} passes "
                           "over its part of the data set: check the bad-data warnings above, or lower "
                           "data.steps_per_epoch / data.batch_size")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields exactly batches_per_epoch - start_batch batches (B, ...) of batch_size."""
        self.batch, self._stats, self.padded, self.consumed = 0, {}, 0, self._fresh_consumed()
        self._warned = {}
        held: list = []  # chunk pieces not handed out yet: (images, labels, ids, keys)
        have, B = 0, self.batch_size
        chunks = self._chunks()
        try:
            while self.batch < self.batches_per_epoch:
                while have < B:
                    c = next(chunks)
                    held.append((c.images, c.labels, c.ids, c.keys))
                    have += len(c.labels)
                x, y, ids = (torch.cat([h[i] for h in held]) for i in range(3))
                keys = [k for h in held for k in h[3]] if self.keys else None
                held = [(x[B:], y[B:], ids[B:], keys[B:] if self.keys else None)]
                have -= B
                self.batch += 1
                if self.consumed is not None:
                    mark(self.consumed, ids[:B].numpy())
                if self.batch <= self.start_batch:
                    continue  # resume: replay without handing out
                if self.keys:
                    self.batch_keys.append(keys[:B])
                yield (normalize_images(x[:B]) if self.normalize else x[:B]), y[:B]
        finally:
            chunks.close()  # shuts the DataLoader workers down

    def _warn_shards(self, stats: dict) -> None:
        """Warns once about each damaged shard a worker's stats report for the first time: the shard, the
        samples lost and this rank's running count of bad samples (before this epoch and in it)."""
        events = stats.get("events", ())
        for kind, _, _, message in events[self._warned.get(stats["worker"], 0):]:
            log.warning("rank %d, epoch %d: %s [%s]; skipped: this rank's bad samples so far: %d (data.max_bad_samples "
                        "stops the run above a limit)", self.rank, self.epoch, message, kind,
                        self.bad_before + self.counters["bad_total"])
        self._warned[stats["worker"]] = len(events)

    @property
    def counters(self) -> dict:
        """The epoch's pass over this rank's part: ``samples`` that reached this process, ``bad`` samples by
        kind and ``bad_total``, ``bad_shards`` {url: samples lost} of the damaged shards; and ``padded``:
        the samples of top-up passes (a top-up pass re-reads the same bad samples: not counted again).
        Chunks still inside workers when the epoch ends are not seen.
        """
        bad: dict[str, int] = {}
        shards: dict[str, int] = {}
        for (pass_index, _), stats in self._stats.items():
            if pass_index:
                continue
            for kind, n in stats["bad"].items():
                if n:
                    bad[kind] = bad.get(kind, 0) + n
            for _, url, lost, _ in stats.get("events", ()):
                shards[url] = shards.get(url, 0) + lost
        samples = sum(s["samples"] for (pass_index, _), s in self._stats.items() if not pass_index)
        return {"samples": samples, "padded": self.padded, "bad": bad, "bad_total": sum(bad.values()),
                "bad_shards": shards}

    def state_dict(self) -> dict:
        """The resume position: (epoch, start_batch=batch, done) with the same seed, world size and batch
        size; on others, the epoch's ``consumed`` mask (this rank's: a checkpoint saves the union over
        ranks) as ``done``. Masks are uint8 tensors, None where the samples have no ids."""
        # the keys "step" (= batch) and "steps_per_epoch" (= batches_per_epoch) are every saved checkpoint's
        # data position (data.pt): kept as they are, so old checkpoints resume
        return {"epoch": self.epoch, "seed": self.seed, "step": self.batch, "steps_per_epoch": self.batches_per_epoch,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_samples": self.num_samples, "done": to_tensor(self.done), "consumed": to_tensor(self.consumed)}


def build_train_loader(cfg, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                       done: np.ndarray | None = None, keys: bool = False) -> TrainLoader:
    """A TrainLoader for ``DataConfig`` cfg on (rank, world_size) for ``epoch`` (see module doc), from the
    data source ``DATA_SOURCES`` registers under ``cfg.source`` (``dsoft_dist.data.sources``).

    done: a done mask over the data set's sample ids (``loader.num_samples`` of them): only the
    epoch's other samples are read; shards without a manifest have no ids and cannot take one.
    keys: collect every handed-out batch's sample keys in ``loader.batch_keys``.
    Raises ValueError naming the key when the config cannot work (manifest disagrees
    with data.num_classes, no manifest and no data.steps_per_epoch, too few samples).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    return DATA_SOURCES.get(cfg.source).loader(cfg, rank, world_size, epoch, start_batch=start_batch, done=done,
                                               keys=keys)



def check_shards(cfg, files: bool = True) -> tuple[list[str], list[int] | None, int]:
    """``resolve_shards``, then the checks a run needs before it starts: every local shard exists (files=True),
    and shards without a manifest come with data.steps_per_epoch. Cheap (no shard is read): ``dsoft train``
    and ``dsoft doctor`` call it before any rank starts. The loader of an epoch passes files=False: a shard
    that vanished while the run goes on is bad data, skipped and counted (``data.max_bad_samples``)."""
    urls, counts, vector_dim = resolve_shards(cfg)
    if files:
        check_local_shards(urls, f"data.shards={cfg.shards!r}" if cfg.shards else f"data.manifest={cfg.manifest!r}")
    if counts is None and getattr(cfg, "steps_per_epoch", 0) <= 0:
        raise ValueError(f"data.shards={cfg.shards!r} without a manifest needs data.steps_per_epoch > 0: set "
                         "data.manifest to the converter's manifest.json (or give the steps explicitly)")
    return urls, counts, vector_dim


def manifest_file(cfg) -> str | None:
    """The manifest a webdataset config names: data.manifest (a manifest.json or its folder; a missing one is
    returned as given, for load_manifest to report), else data.shards when it is a converter's output folder
    holding one; None without a manifest."""
    if cfg.manifest:
        folder = os.path.isdir(cfg.manifest)
        return os.path.join(cfg.manifest, MANIFEST_NAME) if folder else cfg.manifest
    if cfg.shards and os.path.isfile(os.path.join(cfg.shards, MANIFEST_NAME)):
        return os.path.join(cfg.shards, MANIFEST_NAME)  # a converter's output folder
    return None


def resolve_shards(cfg) -> tuple[list[str], list[int] | None, int]:
    """Shard URLs, per-shard counts and the vector size (0: image samples) from data.manifest and/or data.shards.

    The manifest (a manifest.json or its folder) gives local shard paths, counts and the sample
    kind; data.shards, when also set, overrides the URLs (e.g. ``pipe:`` reads of the same
    shards in remote storage) and must list as many shards. Shards without a manifest hold images.
    """
    manifest_path = manifest_file(cfg)
    manifest = load_manifest(manifest_path) if manifest_path else None
    vector_dim = 0
    if manifest is not None:
        check_num_classes(manifest, cfg.num_classes)
        vector_dim = _vector_dim(manifest, cfg)
    if not cfg.shards:
        if manifest is None:
            raise ValueError("data.source=webdataset needs data.shards or data.manifest")
        return manifest.shard_paths(), manifest.shard_counts(), vector_dim
    urls = expand_shards(cfg.shards)
    if manifest is None:
        return urls, None, 0
    if len(urls) != len(manifest.shards):
        raise ValueError(f"data.shards={cfg.shards!r} expands to {len(urls)} shards but the manifest lists "
                         f"{len(manifest.shards)}: make them match, or leave data.shards empty")
    return urls, manifest.shard_counts(), vector_dim


def _vector_dim(manifest, cfg) -> int:
    """The manifest's vector size (0 for images); it must agree with data.vector_dim."""
    if manifest.sample_kind != "vectors":
        return 0
    if cfg.vector_dim != manifest.vector_dim:
        raise ValueError(f"data.vector_dim={cfg.vector_dim} disagrees with the vector shards in {manifest.root!r} "
                         f"({manifest.vector_dim}-d {manifest.vector_dtype}): set data.vector_dim="
                         f"{manifest.vector_dim} (and model.in_features={manifest.vector_dim})")
    return manifest.vector_dim
