"""Feature-vector shards: fixed-size vectors + class ids in WebDataset tars, for the MLP backbone.

Large-scale head experiments train on precomputed features (a frozen backbone's embeddings)
instead of images. A vector sample is two tar members sharing a key:

- ``KEY.f16`` or ``KEY.f32``: the vector's ``vector_dim`` values as raw little-endian float16 /
  float32 (the manifest records ``sample_kind="vectors"``, ``vector_dim`` and ``vector_dtype``);
  ``KEY.npy`` (a NumPy array file, self-describing) is read as well, for shards made elsewhere;
- ``KEY.cls``: the integer class as ASCII text, as for images.

Writers (restartable and parallel like every converter, ``dsoft_dist.data.convert.run_shards``; a rerun
resumes only the same source and options, see there):

    dsoft data synth OUT --vectors --identities 1000000 --samples-per-identity 2 --dim 128
    dsoft data from-npy features.npy labels.npy OUT          # (N, D) features, (N,) int labels

``synth_vectors_to_shards`` writes the same vectors the loader's in-process source
(``data.synthetic_mode=vectors``, ``SyntheticVectors``) generates for the same seed, rounded to
the stored dtype, in a seeded shuffled order; ``from_npy`` reads memory-mapped arrays, so the
features never have to fit in memory. The loader (``ShardStream``) decodes vector samples
with ``dsoft_dist.data.decode.decode_vector`` and hands (B, D) float32 batches to the model.

    python -c "from dsoft_dist.data.vectors import VECTOR_DTYPES; print(VECTOR_DTYPES)"
"""
from __future__ import annotations

import os
from functools import partial
from typing import Iterator

import numpy as np

from dsoft_dist.data.convert import run_shards
from dsoft_dist.data.decode import RAW_VECTOR_DTYPES
from dsoft_dist.data.manifest import Manifest
from dsoft_dist.data.rng import FeistelPermutation
from dsoft_dist.data.shards import BadData
from dsoft_dist.data.synthetic import SyntheticVectors
from dsoft_dist.utils import sha256_file

VECTOR_DTYPES = {"float16": "f16", "float32": "f32"}  # stored dtype -> member extension


def vector_kind(dim: int, dtype: str) -> dict:
    """The manifest fields of a vector shard set; raises ValueError on a bad dim or dtype."""
    if dim < 1:
        raise ValueError(f"vector dim={dim} is invalid: must be >= 1")
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype={dtype!r} is invalid: use one of {', '.join(VECTOR_DTYPES)}")
    return {"sample_kind": "vectors", "vector_dim": int(dim), "vector_dtype": dtype}


def _vector_samples(block, dtype: str, positions, bad: BadData) -> Iterator[dict]:
    """Sample dicts of one shard: block(positions (n,) int64) -> (keys, vectors (n, D), labels (n,))."""
    ext = VECTOR_DTYPES[dtype]
    keys, vectors, labels = block(np.asarray(positions, dtype=np.int64))
    stored = np.ascontiguousarray(vectors, dtype=RAW_VECTOR_DTYPES[ext])  # (n, D)
    for key, vec, label in zip(keys, stored, labels.tolist()):
        yield {"__key__": key, ext: vec.tobytes(), "cls": int(label)}


_SOURCES: dict[tuple, tuple] = {}


def _synth_block(params: tuple, positions: np.ndarray):
    """The vectors at shuffled positions of a synthetic set: ids -> (identity, index) -> SyntheticVectors."""
    num_identities, per_identity, dim, seed, identity_offset = params
    if params not in _SOURCES:  # one generator per writer process
        _SOURCES[params] = (SyntheticVectors(num_identities, dim=dim, seed=seed, identity_offset=identity_offset),
                            FeistelPermutation(num_identities * per_identity, seed))
    source, perm = _SOURCES[params]
    identity, index = np.divmod(perm(positions), per_identity)
    keys = [f"{i:09d}_{j:05d}" for i, j in zip(identity.tolist(), index.tolist())]
    return keys, source.batch(identity, index), identity


def synth_vectors_to_shards(out_dir: str, num_identities: int, samples_per_identity: int, dim: int = 128,
                            dtype: str = "float16", seed: int = 0, identity_offset: int = 0, **kw) -> Manifest:
    """Synthetic vector identities -> shards (seeded shuffled order); labels are local ids.

    kw: run_shards options (per_shard, workers, policy, overwrite, progress).
    """
    kind = vector_kind(dim, dtype)
    if num_identities < 1 or samples_per_identity < 1:
        raise ValueError(f"identities={num_identities}, samples_per_identity={samples_per_identity}: both must be "
                         ">= 1")
    total = num_identities * samples_per_identity
    params = (int(num_identities), int(samples_per_identity), int(dim), int(seed), int(identity_offset))
    source = {"kind": "synthetic-vectors", "num_identities": num_identities,
              "samples_per_identity": samples_per_identity, "seed": seed, "identity_offset": identity_offset}
    samples = partial(_vector_samples, partial(_synth_block, params), dtype)
    return run_shards(out_dir, range(total), samples, num_identities, source, kind=kind, **kw)


def _npy_block(features_path: str, labels_path: str, order_seed: int | None, positions: np.ndarray):
    """Rows of memory-mapped (N, D) features and (N,) labels at (optionally permuted) positions."""
    features, labels = np.load(features_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r")
    rows = positions if order_seed is None else FeistelPermutation(len(labels), order_seed)(positions)
    order = np.argsort(rows)  # read the memory map in ascending row order, hand the rows back shuffled
    vectors = np.empty((len(rows), features.shape[1]), dtype=features.dtype)
    vectors[order] = features[rows[order]]
    return [f"{r:09d}" for r in rows.tolist()], vectors, np.asarray(labels[rows], dtype=np.int64)


def _open_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist: give a .npy file written by numpy.save")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise ValueError(f"{what} {path!r} is not a readable .npy array ({exc})") from exc


def from_npy(features_path: str, labels_path: str, out_dir: str, dtype: str = "float16", shuffle: bool = True,
             seed: int = 0, num_classes: int = 0, **kw) -> Manifest:
    """(N, D) features + (N,) integer labels (.npy) -> vector shards (see module doc).

    num_classes: 0 = max label + 1. shuffle: write the rows in a seeded shuffled order (features
    are often grouped by identity; shards should each hold many). kw: run_shards options.
    """
    features, labels = _open_npy(features_path, "features"), _open_npy(labels_path, "labels")
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or not len(labels):
        raise ValueError(f"features {features_path!r} {features.shape} and labels {labels_path!r} {labels.shape} "
                         "do not match: need (N, D) features and (N,) labels with N >= 1")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels {labels_path!r} have dtype {labels.dtype}: need integer class ids")
    low, high = int(labels.min()), int(labels.max())
    num_classes = num_classes or high + 1
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels {labels_path!r} span [{low}, {high}], outside [0, num_classes={num_classes}): "
                         "relabel them to 0..C-1 or raise --num-classes")
    kind = vector_kind(features.shape[1], dtype)
    # the features' size and modification time (hashing them could take minutes), the labels' bytes
    stat = os.stat(features_path)
    source = {"kind": "npy", "features": os.path.abspath(features_path), "labels": os.path.abspath(labels_path),
              "rows": len(labels), "features_dtype": str(features.dtype), "features_bytes": stat.st_size,
              "features_mtime_ns": stat.st_mtime_ns, "labels_sha256": sha256_file(labels_path),
              "shuffle_seed": seed if shuffle else None}
    block = partial(_npy_block, os.path.abspath(features_path), os.path.abspath(labels_path),
                    seed if shuffle else None)
    return run_shards(out_dir, range(len(labels)), partial(_vector_samples, block, dtype), num_classes, source,
                      kind=kind, **kw)
