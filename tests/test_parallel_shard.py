"""Class-shard math and the single-process behaviour of the counted collectives.

    python -m pytest tests/test_parallel_shard.py
"""
from __future__ import annotations

import pytest
import torch

from dsoft_dist.parallel import CommCounter, all_gather_cat, gather_rows, reduce_replicated, shard_range, shard_ranges


@pytest.mark.parametrize("num_classes, world_size", [(c, p) for c in (1, 7, 37, 100, 1001)
                                                     for p in (1, 2, 3, 4, 7) if p <= c])
def test_shards_tile_the_classes_contiguously_and_evenly(num_classes, world_size):
    ranges = shard_ranges(num_classes, world_size)
    cursor = 0
    for start, count in ranges:
        assert start == cursor and count >= 1
        cursor += count
    assert cursor == num_classes
    counts = [n for _, n in ranges]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_matches_design_formula():
    assert shard_ranges(37, 4) == [(0, 10), (10, 9), (19, 9), (28, 9)]
    assert shard_range(10, 3, 2) == (7, 3)


def test_world_larger_than_classes_is_an_error():
    with pytest.raises(ValueError, match="world size 5 is larger than num_classes=3"):
        shard_range(3, 5, 0)
    with pytest.raises(ValueError, match="rank=4 is outside"):
        shard_range(10, 4, 4)


def test_collectives_are_identity_without_a_process_group():
    counter = CommCounter()
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_rows(x, None, counter)
    s = reduce_replicated(x, None, counter)
    assert torch.equal(y, x) and s.shape == (3, 4)
    (y.sum() + 2 * s.sum()).backward()
    assert torch.equal(x.grad, torch.full((3, 4), 3.0))
    assert torch.equal(all_gather_cat(x.detach(), None, counter), x.detach())
    assert counter.bytes == 0 and counter.calls == 0
