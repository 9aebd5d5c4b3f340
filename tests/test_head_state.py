"""World-size-independent head / optimizer state: pieces re-assemble for any sharding; clear errors.

The multi-process save-on-2 / load-on-1-and-3 run is in tests/test_head_dist.py; here the
pieces of other world sizes are cut from a single-process head by class range.

    python -m pytest tests/test_head_state.py
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dsoft_dist.head import (
    RowSparseAdamW,
    RowSparseSGD,
    ShardedClassifier,
    assemble_rows,
    load_head_checkpoint,
    save_head_checkpoint,
)
from dsoft_dist.parallel import shard_ranges

C, D = 23, 4


def _split(piece, world_size):
    """The pieces P ranks would have written, cut from a whole-head piece."""
    out = []
    for start, count in shard_ranges(piece["num_classes"], world_size):
        rows = {k: v[start:start + count].clone() for k, v in piece["rows"].items()}
        out.append({**piece, "class_start": start, "num_local_classes": count, "rows": rows})
    return out


def _trained_head_and_opt(cls=RowSparseAdamW):
    head = ShardedClassifier(C, D, negatives="batch", seed=1)
    opt = cls([head.weight], lr=0.05, num_classes=C, class_start=0, **({"momentum": 0.9} if cls is RowSparseSGD else {}))
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        head(torch.randn(6, D, generator=gen), torch.randint(0, C, (6,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    return head, opt


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_head_pieces_of_any_world_size_load_into_one_rank(world_size):
    head, _ = _trained_head_and_opt()
    fresh = ShardedClassifier(C, D, seed=9)
    fresh.load_state_dict(list(reversed(_split(head.state_dict(), world_size))))
    assert torch.equal(fresh.weight, head.weight) and fresh.draws == head.draws == 2


@pytest.mark.parametrize("cls", [RowSparseSGD, RowSparseAdamW])
@pytest.mark.parametrize("world_size", [2, 3])
def test_optimizer_state_reshards_both_ways(cls, world_size):
    head, opt = _trained_head_and_opt(cls)
    full = opt.state_dict()
    pieces = []
    for start, count in shard_ranges(C, world_size):  # load the whole-shard state into Q shards ...
        weight = torch.nn.Parameter(torch.zeros(count, D))
        shard_opt = cls([weight], lr=1.0, num_classes=C, class_start=start)
        shard_opt.load_state_dict(full)
        for name, tensor in opt.state[head.weight].items():
            assert torch.equal(shard_opt.state[weight][name], tensor[start:start + count]), name
        assert shard_opt.param_groups[0]["lr"] == 0.05
        pieces.append(shard_opt.state_dict())
    back = cls([torch.nn.Parameter(torch.zeros(C, D))], lr=1.0, num_classes=C)  # ... and back into one
    back.load_state_dict(pieces)
    for name, tensor in opt.state[head.weight].items():
        assert torch.equal(back.state[back.param_groups[0]["params"][0]][name], tensor), name


def test_mismatched_shapes_and_gaps_are_clear_errors():
    piece = ShardedClassifier(C, D).state_dict()
    with pytest.raises(ValueError, match=f"checkpoint has num_classes={C} but the head has num_classes={C + 1}"):
        ShardedClassifier(C + 1, D).load_state_dict(piece)
    with pytest.raises(ValueError, match=f"checkpoint has embedding_size={D} but the head has embedding_size=8"):
        ShardedClassifier(C, 8).load_state_dict(piece)
    parts = _split(piece, 3)
    with pytest.raises(ValueError, match=r"do not cover classes \[8, 23\)"):
        ShardedClassifier(C, D).load_state_dict([parts[0], parts[2]])
    with pytest.raises(ValueError, match="format"):
        ShardedClassifier(C, D).load_state_dict({"weight": torch.zeros(C, D)})
    with pytest.raises(ValueError, match="checkpoint optimizer is \\['sgd'\\] but this one is 'adamw'"):
        RowSparseAdamW([torch.nn.Parameter(torch.zeros(C, D))]).load_state_dict(
            RowSparseSGD([torch.nn.Parameter(torch.zeros(C, D))], lr=0.1, momentum=0.9).state_dict())


def test_assemble_rows_cuts_across_piece_boundaries():
    piece = {"class_start": 0, "num_local_classes": C, "rows": {"w": torch.arange(C * 2.0).reshape(C, 2)}}
    parts = _split({**piece, "num_classes": C}, 4)
    assert torch.equal(assemble_rows(parts, "w", 5, 11), piece["rows"]["w"][5:16])


def test_checkpoint_files_round_trip_atomically(tmp_path):
    head, opt = _trained_head_and_opt()
    save_head_checkpoint(str(tmp_path / "ck"), head, opt)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == [f"head-{0:012d}-{C:012d}.pt", "meta.json"], names  # no temp files left behind
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert (meta["num_classes"], meta["embedding_size"], meta["world_size"], meta["step"]) == (C, D, 1, 2)
    fresh = ShardedClassifier(C, D, seed=5)
    fresh_opt = RowSparseAdamW([fresh.weight], lr=1.0, num_classes=C)
    load_head_checkpoint(str(tmp_path / "ck"), fresh, fresh_opt)
    assert torch.equal(fresh.weight, head.weight) and fresh.draws == 2
    for name, tensor in opt.state[head.weight].items():
        assert torch.equal(fresh_opt.state[fresh.weight][name], tensor)
    with pytest.raises(ValueError, match=f"has num_classes={C} but the head has num_classes=30"):
        load_head_checkpoint(str(tmp_path / "ck"), ShardedClassifier(30, D))
    with pytest.raises(FileNotFoundError, match="not a head checkpoint"):
        load_head_checkpoint(str(tmp_path / "missing"), fresh)
