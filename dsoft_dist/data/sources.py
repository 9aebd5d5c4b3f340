"""The training data sources ``data.source`` names, registered in ``dsoft_dist.registry.DATA_SOURCES``:
``synthetic`` (procedural identities: face-like or glyph images, or vectors; no files) and ``webdataset`` (tar
shards and the converters' manifest). Each is a ``DataSource`` giving what the run needs of its data:

    source = DATA_SOURCES.get(cfg.data.source)
    loader = source.loader(cfg.data, rank, world_size, epoch, start_batch, done, keys)   # a TrainLoader
    source.check(cfg.data)        # the cheap check before any rank starts (raises ValueError / OSError)
    source.identity(cfg.data)     # what defines the data of a run, for run.json (dsoft_dist.train.runfolder)

``dsoft_dist.data.build_train_loader`` is the lookup; the loader's arguments are its (see
``dsoft_dist.data.pipeline``: every rank gets the same ``len(loader)`` batches; ``start_batch`` replays,
``done`` leaves out the samples an interrupted epoch already used, ``keys`` collects sample keys).
A source of your own builds a ``TrainLoader`` over its own per-worker streams (``Chunk`` items,
``dsoft_dist.data.datasets``), with ``loader_kwargs`` and ``epoch_batches`` below, registers from a
module named in the config's ``extra_modules``, and is chosen with ``data.source=<its name>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dsoft_dist.data.datasets import ShardStream, Slot, SyntheticImageStream, SyntheticVectorStream
from dsoft_dist.data.decode import Augment
from dsoft_dist.data.glyphs import glyph_capacity, glyph_set_digest
from dsoft_dist.data.pipeline import TrainLoader, check_shards, manifest_file
from dsoft_dist.data.position import count_done
from dsoft_dist.data.synthetic import vector_difficulty
from dsoft_dist.registry import DATA_SOURCES
from dsoft_dist.utils import sha256_file


@dataclass(frozen=True, eq=False)
class DataSource:
    """One data source (see the module doc).

    loader(cfg, rank, world_size, epoch, start_batch=0, done=None, keys=False) -> TrainLoader for a DataConfig;
    check(cfg) -> None: what can be checked before the ranks start, cheaply (no sample read); raises
    ValueError / OSError naming the key and the fix; identity(cfg) -> dict: the values that define the data
    a run trains on (a run folder refuses to continue with other values).
    """

    loader: Callable[..., TrainLoader]
    check: Callable[[object], None]
    identity: Callable[[object], dict]


def epoch_batches(total: int, world_size: int, batch_size: int, explicit: int, done: np.ndarray | None) -> int:
    """Batches per epoch and rank: floor(floor(N / world_size) / batch_size) of the N samples left, or the
    explicit count (``data.steps_per_epoch``) less the global batches the done samples filled."""
    left = total - (0 if done is None else count_done(done))
    if explicit > 0:
        return explicit if done is None else explicit - -(-(total - left) // (world_size * batch_size))
    return (left // world_size) // batch_size


def loader_kwargs(cfg, rank: int, world_size: int, epoch: int, start_batch: int, done, keys: bool) -> dict:
    """The TrainLoader arguments every source passes the same way (batch size, workers, place, position)."""
    return dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, rank=rank, world_size=world_size,
                epoch=epoch, seed=cfg.seed, start_batch=start_batch, done=done, keys=keys)


def _slots(cfg, rank: int, world_size: int, epoch: int) -> Callable[[int], Slot]:
    return lambda pass_index: Slot(rank=rank, world_size=world_size, epoch=epoch, seed=cfg.seed,
                                   pass_index=pass_index)


def _augment(cfg) -> Augment:
    return Augment(flip=cfg.augment_flip, color_jitter=cfg.color_jitter, random_crop=getattr(cfg, "random_crop", False))


def _chunk(cfg) -> int:
    return max(1, min(64, cfg.batch_size))  # samples per worker item (vectors: at least 256)


def synthetic_loader(cfg, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                     done: np.ndarray | None = None, keys: bool = False) -> TrainLoader:
    """The procedural identities: num_classes x samples_per_class images (B, 3, S, S) of faces or glyphs
    (data.synthetic_mode images | glyphs), or vectors (B, D)."""
    slot, extra = _slots(cfg, rank, world_size, epoch), dict(done=done, keys=keys)
    common = loader_kwargs(cfg, rank, world_size, epoch, start_batch, done, keys)
    total = cfg.num_classes * cfg.samples_per_class
    batches = epoch_batches(total, world_size, cfg.batch_size, getattr(cfg, "steps_per_epoch", 0), done)
    if cfg.synthetic_mode == "vectors":
        dim = getattr(cfg, "vector_dim", 128)
        nuisance = vector_difficulty(getattr(cfg, "difficulty", "medium"))
        make = lambda p: SyntheticVectorStream(cfg.num_classes, cfg.samples_per_class, dim, slot(p),  # noqa: E731
                                               chunk=max(_chunk(cfg), 256), **nuisance, **extra)
        return TrainLoader(make, batches, normalize=False, num_samples=total, **common)
    difficulty, glyphs = getattr(cfg, "difficulty", "medium"), cfg.synthetic_mode == "glyphs"
    augment = _augment(cfg)
    if glyphs:  # a mirrored glyph is another character (b/d, p/q, </>): data.augment_flip is for faces
        augment = Augment(flip=False, color_jitter=augment.color_jitter, random_crop=augment.random_crop)
    make = lambda p: SyntheticImageStream(cfg.num_classes, cfg.samples_per_class, cfg.image_size,  # noqa: E731
                                          slot(p), chunk=_chunk(cfg), difficulty=difficulty, augment=augment,
                                          glyphs=glyphs, **extra)
    return TrainLoader(make, batches, num_samples=total, **common)


def webdataset_loader(cfg, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                      done: np.ndarray | None = None, keys: bool = False) -> TrainLoader:
    """Tar shards (``data.shards`` and/or ``data.manifest``): images, or vectors when the manifest says so."""
    urls, counts, vector_dim = check_shards(cfg, files=False)  # a shard that vanished mid-run: bad data
    if counts is None and done is not None:
        raise ValueError(f"data.shards={cfg.shards!r} has no manifest, so its samples have no ids and a done mask "
                         "cannot apply: set data.manifest")
    slot, chunk = _slots(cfg, rank, world_size, epoch), _chunk(cfg)
    total = None if counts is None else sum(counts)
    batches = epoch_batches(total or 0, world_size, cfg.batch_size, getattr(cfg, "steps_per_epoch", 0), done)
    make = lambda p: ShardStream(urls, counts, cfg.num_classes, cfg.image_size, slot(p),  # noqa: E731
                                 chunk=max(chunk, 256) if vector_dim else chunk,
                                 shuffle_buffer_size=cfg.shuffle_buffer, augment=_augment(cfg), policy=cfg.bad_data,
                                 vector_dim=vector_dim, done=done, keys=keys)
    return TrainLoader(make, batches, num_samples=total, normalize=not vector_dim,
                       **loader_kwargs(cfg, rank, world_size, epoch, start_batch, done, keys))



def _check_synthetic(cfg) -> None:
    """Synthetic data has nothing to find before the start: it is generated on the fly. Glyphs are a finite
    set: data.num_classes must fit its training side (``glyph_capacity``)."""
    if getattr(cfg, "synthetic_mode", "images") == "glyphs":
        train = glyph_capacity()["train"]
        if cfg.num_classes > train:
            raise ValueError(f"data.num_classes={cfg.num_classes} is invalid with data.synthetic_mode=glyphs: the "
                             f"glyph set has {train} training identities (the rest are kept for evaluation): set "
                             f"data.num_classes <= {train}")


def _check_webdataset(cfg) -> None:
    """``check_shards``: the manifest agrees with the config, every local shard exists (no shard is read)."""
    check_shards(cfg)


def synthetic_identity(cfg) -> dict:
    """The generator's parameters; for glyphs also the character set's digest, which comes from the installed
    fonts (another matplotlib may give other characters)."""
    keys = ("synthetic_mode", "samples_per_class", "image_size", "difficulty", "vector_dim")
    identity = {"source": "synthetic", **{k: getattr(cfg, k) for k in keys}}
    if identity["synthetic_mode"] == "glyphs":
        identity["glyph_set"] = glyph_set_digest()
    return identity


def webdataset_identity(cfg) -> dict:
    """The manifest's content hash (it lists every shard's sha256), else the shard pattern."""
    manifest = manifest_file(cfg)
    if manifest and os.path.isfile(manifest):
        return {"source": "webdataset", "manifest_sha256": sha256_file(manifest)[:16]}
    return {"source": "webdataset", "shards": cfg.shards}


DATA_SOURCES.register("synthetic", DataSource(synthetic_loader, _check_synthetic, synthetic_identity))
DATA_SOURCES.register("webdataset", DataSource(webdataset_loader, _check_webdataset, webdataset_identity))
