"""The world-size-independent epoch position: done masks, the cut over the samples left, and loaders
that resume an epoch on another number of ranks reading each remaining sample exactly once.

    python -m pytest tests/test_data_position.py
"""
from __future__ import annotations

import numpy as np
import pytest

from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import assign_samples, build_train_loader
from dsoft_dist.data.datasets import Slot, synthetic_positions
from dsoft_dist.data.position import count_done, done_range, from_tensor, is_done, mark, new_mask, to_tensor
from tests.test_data_fixtures import write_shards


def _mask_of(ids, n: int) -> np.ndarray:
    mask = new_mask(n)
    mark(mask, np.asarray(sorted(ids), dtype=np.int64))
    return mask


def test_mask_bits_agree_with_a_set():
    rng = np.random.default_rng(0)
    n = 203  # not a multiple of 8
    ids = set(rng.choice(n, size=70, replace=False).tolist())
    mask = _mask_of(ids, n)
    mark(mask, [next(iter(ids))])  # setting a bit twice changes nothing
    assert mask.shape == (26,) and count_done(mask) == len(ids)
    assert is_done(mask, np.arange(n)).tolist() == [i in ids for i in range(n)]
    for start, stop in [(0, n), (3, 11), (8, 16), (197, 203), (50, 50)]:
        assert done_range(mask, start, stop).tolist() == [i in ids for i in range(start, stop)]
    assert np.array_equal(from_tensor(to_tensor(mask), n), mask)
    with pytest.raises(ValueError, match="covers 208 sample ids but this data set has 300"):
        from_tensor(to_tensor(mask), 300)


def _plan_ids(counts, plan, done) -> list[int]:
    starts = np.concatenate([[0], np.cumsum(counts)])
    ids = [int(starts[s]) + i for s, a, b in plan for i in range(a, b)]
    return [i for i in ids if not is_done(done, [i])[0]]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_the_cut_over_the_samples_left_is_a_balanced_partition(world, workers):
    counts = np.array([4, 0, 9, 2, 7, 1, 11])
    n = int(counts.sum())
    done = _mask_of(np.random.default_rng(world).choice(n, size=13, replace=False), n)
    per_rank = []
    for r in range(world):
        ids = [i for w in range(workers)
               for i in _plan_ids(counts, assign_samples(counts, r, world, w, workers, 2, 1, done=done), done)]
        per_rank.append(ids)
    everything = sorted(sum(per_rank, []))
    assert everything == [i for i in range(n) if not is_done(done, [i])[0]]  # each sample left, once
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    with pytest.raises(ValueError, match="needs per-shard counts"):
        assign_samples(len(counts), 0, 1, 0, 1, done=done)


def test_synthetic_positions_with_a_done_mask_cut_the_permutation_left():
    total, done = 500, _mask_of(range(0, 500, 3), 500)
    order = np.concatenate(list(synthetic_positions(total, Slot(epoch=2, seed=4), 0, 1, block=64)))
    left = [int(i) for i in order if not is_done(done, [i])[0]]  # the epoch order without the done ids
    pieces = [np.concatenate(list(synthetic_positions(total, Slot(r, 3, epoch=2, seed=4), w, 2, block=64,
                                                      done=done))).tolist() for r in range(3) for w in range(2)]
    assert sum(pieces, []) == left  # contiguous ranges of the order left, in (rank, worker) order


def _epoch(cfg, world: int, batches: int | None = None, done=None):
    """Runs ``batches`` batches (all when None) of every rank of ``world``; returns their keys and the
    union of their consumed masks (what a checkpoint saves)."""
    keys, union = [], None
    for rank in range(world):
        loader = build_train_loader(cfg, rank, world, epoch=1, done=done, keys=True)
        it = iter(loader)
        for _ in range(len(loader) if batches is None else batches):
            next(it)
        it.close()
        keys += sum(loader.batch_keys, [])
        union = loader.consumed if union is None else union | loader.consumed
    return keys, union


def _configs(tmp_path):
    """240 samples: batch 4 on 2 ranks = 8 a global batch; 6 batches leave 192, which 1 x 4 and 3 x 4 divide."""
    write_shards(str(tmp_path), [37, 50, 13, 61, 79], num_classes=240)
    shards = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=240, image_size=8, batch_size=4,
                        num_workers=2, shuffle_buffer=16)
    vectors = DataConfig(source="synthetic", synthetic_mode="vectors", vector_dim=8, num_classes=40,
                         samples_per_class=6, batch_size=4, num_workers=2)
    images = DataConfig(source="synthetic", num_classes=40, samples_per_class=6, image_size=8, batch_size=4,
                        num_workers=0)
    return {"shards": shards, "vectors": vectors, "images": images}


@pytest.mark.parametrize("source", ["shards", "vectors", "images"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_an_epoch_resumed_on_another_world_size_reads_each_sample_once(tmp_path, source, new_world):
    cfg = _configs(tmp_path)[source]
    first, done = _epoch(cfg, 2, batches=6)
    assert len(first) == len(set(first)) == 48 and count_done(done) == 48
    rest, union = _epoch(cfg, new_world, done=done)
    assert len(rest) == 192 and not set(first) & set(rest), "a sample was read again"
    whole, _ = _epoch(cfg, 2)
    assert sorted(first + rest) == sorted(whole) and len(set(whole)) == 240, "a sample was lost"
    assert count_done(union) == 240


def test_explicit_steps_per_epoch_less_the_batches_done(tmp_path):
    cfg = _configs(tmp_path)["vectors"]
    cfg.steps_per_epoch = 20
    _, done = _epoch(cfg, 2, batches=6)  # 48 samples: 12 global batches of 4 on one rank

    assert len(build_train_loader(cfg, 0, 1, epoch=1, done=done)) == 8
    assert len(build_train_loader(cfg, 0, 2, epoch=1, done=done)) == 14  # ceil(48 / 8) = 6 done
