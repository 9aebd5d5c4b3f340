"""Streaming from real tar shards: exact-once split over ranks x workers, seeded order, fixed batches per epoch."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import assign_samples, build_train_loader, expand_shards, load_manifest
from dsoft_dist.data.datasets import ShardStream, Slot
from dsoft_dist.data.position import done_range
from tests.test_data_fixtures import write_shards

COUNTS = [7, 3, 5, 1, 6]  # uneven shard sizes, 5 shards for 2 ranks x 2 workers = 4 slots


def _epoch_labels(urls, counts, rank, world, epoch, seed=0, workers=2, buffer=4):
    stream = ShardStream(urls, counts, num_classes=sum(COUNTS), image_size=8,
                         slot=Slot(rank=rank, world_size=world, epoch=epoch, seed=seed), chunk=3,
                         shuffle_buffer_size=buffer)
    labels = []
    for chunk in DataLoader(stream, batch_size=None, num_workers=workers):
        labels += chunk.labels.tolist()
    return labels


@pytest.mark.parametrize("with_counts", [True, False])
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, with_counts):
    urls = write_shards(str(tmp_path), COUNTS)
    counts = COUNTS if with_counts else None
    for epoch in (0, 1):
        per_rank = [_epoch_labels(urls, counts, r, 2, epoch) for r in range(2)]
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == list(range(sum(COUNTS))), "not exactly once"
        assert not set(per_rank[0]) & set(per_rank[1]), "ranks overlap"
        if with_counts:  # balanced to within one sample
            assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_order_is_seeded_and_changes_per_epoch(tmp_path):
    urls = write_shards(str(tmp_path), COUNTS)
    first = _epoch_labels(urls, COUNTS, 0, 2, epoch=0)
    assert first == _epoch_labels(urls, COUNTS, 0, 2, epoch=0)
    assert first != _epoch_labels(urls, COUNTS, 0, 2, epoch=1)
    assert first != _epoch_labels(urls, COUNTS, 0, 2, epoch=0, seed=5)


def test_assign_samples_split_is_a_partition():
    counts = [4, 0, 9, 2, 7, 1]
    for world, workers in [(1, 1), (2, 2), (3, 2), (4, 3)]:
        seen = []
        for r in range(world):
            for w in range(workers):
                for s, a, b in assign_samples(counts, r, world, w, workers, epoch=3, seed=1):
                    seen += [(s, i) for i in range(a, b)]
        assert sorted(seen) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    with pytest.raises(ValueError, match="rank=2/world_size=2"):
        assign_samples(counts, 2, 2, 0, 1)


def test_loader_gives_equal_batches_on_every_rank(tmp_path):
    write_shards(str(tmp_path), COUNTS)  # 22 samples -> 11 per rank -> 2 batches of 5
    delivered, lengths = [], []
    for rank in range(2):
        cfg = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=22, image_size=8, batch_size=5,
                         num_workers=2, shuffle_buffer=4)
        loader = build_train_loader(cfg, rank, 2, epoch=0)
        batches = list(loader)
        lengths.append(len(batches))
        mine = []
        for x, y in batches:
            assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert -1.0 <= x.min() and x.max() <= 1.0
            mine += y.tolist()
        delivered += mine
        assert loader.counters["bad_total"] == 0 and loader.counters["samples"] >= 10
        state = loader.state_dict()
        consumed = state.pop("consumed")  # sample n has label n: the mask is exactly the samples handed out
        assert np.flatnonzero(done_range(consumed.numpy(), 0, 22)).tolist() == sorted(mine)
        assert state == {"epoch": 0, "seed": 0, "step": 2, "steps_per_epoch": 2, "rank": rank, "world_size": 2,
                         "batch_size": 5, "num_samples": 22, "done": None}
    assert lengths == [2, 2]
    assert len(delivered) == len(set(delivered)) == 20


def test_loader_exact_once_when_divisible_and_resume(tmp_path):
    write_shards(str(tmp_path), [6, 2, 4])  # 12 samples, 2 ranks, batch 3 -> 2 batches each, nothing dropped
    cfg = DataConfig(source="webdataset", shards=str(tmp_path), num_classes=12, image_size=8, batch_size=3,
                     num_workers=2, augment_flip=False)
    runs = [[y.tolist() for _, y in build_train_loader(cfg, r, 2, epoch=4)] for r in range(2)]
    assert sorted(sum(runs[0] + runs[1], [])) == list(range(12))
    resumed = [y.tolist() for _, y in build_train_loader(cfg, 0, 2, epoch=4, start_batch=1)]

    assert resumed == runs[0][1:]


def test_shard_specs(tmp_path):
    urls = write_shards(str(tmp_path), [2, 2, 2])
    pattern = os.path.join(str(tmp_path), "shard-{0000..0002}.tar")
    assert expand_shards(pattern) == urls
    assert expand_shards(str(tmp_path)) == load_manifest(str(tmp_path)).shard_paths()
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(urls) + "\n")
    assert expand_shards(str(listing)) == urls
    pipes = [f"pipe:cat {u}" for u in urls]
    assert sorted(_epoch_labels(pipes, [2, 2, 2], 0, 1, 0, workers=1)) == list(range(6))
    # 4 ranks over 3 shards of 2: cuts fall inside shards, so pipes get closed early
    per_rank = [_epoch_labels(pipes, [2, 2, 2], r, 4, 0, workers=1, buffer=0) for r in range(4)]
    assert sorted(sum(per_rank, [])) == list(range(6)) and sorted(map(len, per_rank)) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="empty"):
        expand_shards("  ")


def test_manifest_disagreement_is_refused(tmp_path):
    write_shards(str(tmp_path), [3, 3])
    cfg = DataConfig(source="webdataset", manifest=str(tmp_path / "manifest.json"), num_classes=7)
    with pytest.raises(ValueError, match="data.num_classes=7 disagrees.*set data.num_classes=6"):
        build_train_loader(cfg, 0, 1, 0)
    cfg = DataConfig(source="webdataset", shards=str(tmp_path / "shard-0000.tar"), num_classes=6)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_train_loader(cfg, 0, 1, 0)


def test_augmentations_keep_shape_and_are_seeded():
    import numpy as np

    from dsoft_dist.data.decode import Augment, normalize_images

    img = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    aug = Augment(flip=True, color_jitter=0.4, random_crop=True)
    a = [aug(img, np.random.default_rng(s)) for s in range(8)]
    b = [aug(img, np.random.default_rng(s)) for s in range(8)]
    assert all(x.shape == (16, 16, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) == 8
    assert np.array_equal(Augment(flip=False)(img, np.random.default_rng(0)), img)
    x = normalize_images(torch.from_numpy(np.stack([img, img])))
    assert x.shape == (2, 3, 16, 16) and x.is_contiguous()
    assert torch.allclose(x[0, :, 3, 4], torch.from_numpy(img[3, 4]).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="rank=2 is outside"):
        build_train_loader(DataConfig(), 2, 2, 0)
