"""negatives="nearest" (D-Softmax-KN) in one process: its table of nearest classes against the full (C, C) cosine
product, its selection against a plain reference, the head's loss and gradients against the functional loss over
that set, the table's build schedule, and a checkpoint that resumes exactly with the table it had.

The multi-process (gloo) runs of the same mode are in tests/test_head_dist.py.

    python -m pytest tests/test_head_nearest.py
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dsoft_dist.head.nearest as nearest
from dsoft_dist.config.schema import HeadConfig, OptimizerConfig
from dsoft_dist.errors import ConfigError
from dsoft_dist.head import ShardedClassifier, build_head_optimizer, load_head_checkpoint, save_head_checkpoint
from dsoft_dist.losses import DSoftmaxLoss
from dsoft_dist.losses import functional as LF
from dsoft_dist.losses.negatives import (
    class_mask,
    draw_seed,
    num_sampled,
    sample_without_replacement,
    select_nearest,
    select_shard_classes,
)
from dsoft_dist.registry import LOSSES

C, D, B, RATE, SEED = 41, 6, 10, 0.3, 5
SGD = OptimizerConfig(name="sgd", lr=0.5, momentum=0.9, weight_decay=0.01)


def reference_table(weight: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's per_class nearest classes by weight cosine, from the whole (C, C) product (itself left out)."""
    unit = F.normalize(weight.detach().float(), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)
    values, ids = cos.topk(min(per_class, weight.shape[0] - 1), dim=1)
    return ids, values


def reference_lookup(labels, ids, cos):
    """(B, M) rows of the table for each label; -1 ids for an ignored row."""
    rows = ids[labels.clamp(min=0)].clone()
    rows[labels < 0] = -1
    return rows, cos[labels.clamp(min=0)]


def reference_select(neighbours, neighbour_cos, start, count, rate, share, seed, draw, rank=0) -> list[int]:
    """The shard's nearest rows written out: each class's best cosine, the best first (ties: the lower id), up to
    round(share K), then the random rows D-Softmax-K would draw with those excluded."""
    k = num_sampled(count, rate)
    best: dict[int, float] = {}
    for ids, values in zip(neighbours.tolist(), neighbour_cos.tolist()):
        for c, v in zip(ids, values):
            if c >= 0 and start <= c < start + count:
                best[c - start] = max(best.get(c - start, -math.inf), v)
    near = sorted(best, key=lambda c: (-best[c], c))[:round(share * k)]
    rest = sample_without_replacement(count, k - len(near), draw_seed(seed, draw, rank),
                                      exclude=torch.tensor(sorted(near), dtype=torch.int64))
    return sorted(near + rest.tolist())


def batch(step: int = 0):
    gen = torch.Generator().manual_seed(100 + step)
    emb = torch.randn(B, D, generator=gen)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[0] = -1
    return emb, labels


def nearest_head(**kwargs) -> ShardedClassifier:
    head = ShardedClassifier(C, D, negatives="nearest", sample_rate=RATE, seed=SEED, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(7)))
    return head


@pytest.mark.parametrize("per_class", [1, 3, 8, 60])
def test_the_table_is_the_top_of_the_full_cosine_product_whatever_the_tiles(per_class, monkeypatch):
    head = nearest_head(nearest_per_class=per_class)
    monkeypatch.setattr(nearest, "TILE_ROWS", 5)  # several row and column tiles at C = 41
    monkeypatch.setattr(nearest, "TILE_COLS", 7)
    head.nearest.build(head)
    ids, cos = reference_table(head.weight, per_class)
    assert head.nearest.ids.shape == (C, min(per_class, C - 1))
    assert torch.equal(head.nearest.ids, ids)
    torch.testing.assert_close(head.nearest.cos, cos, rtol=0, atol=1e-6)
    assert not (head.nearest.ids == torch.arange(C)[:, None]).any(), "a class is its own nearest class"


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("start,count", [(0, C), (12, 17)])
def test_selection_matches_the_plain_reference(share, start, count):
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(3))
    emb, labels = batch()
    neighbours, neighbour_cos = reference_lookup(labels, *reference_table(weight, 8))
    for draw in range(3):
        got = select_nearest(neighbours, neighbour_cos, start, count, RATE, share, SEED, draw, rank=1)
        want = reference_select(neighbours, neighbour_cos, start, count, RATE, share, SEED, draw, rank=1)
        assert got.tolist() == want, f"share={share} draw={draw}"
        assert got.numel() == num_sampled(count, RATE) and got.unique().numel() == got.numel()


def test_with_no_share_the_set_is_d_softmax_k_s():
    emb, labels = batch()
    neighbours, neighbour_cos = reference_lookup(labels, *reference_table(torch.randn(C, D), 8))
    got = select_nearest(neighbours, neighbour_cos, 0, C, RATE, 0.0, SEED, 4)
    assert torch.equal(got, select_shard_classes("random", labels, 0, C, RATE, SEED, 4))


@pytest.mark.parametrize("loss", ["d_softmax", "arcface"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_loss_and_gradients_match_the_functional_loss_over_the_reference_set(loss, chunk):
    head = nearest_head(loss=loss, chunk_size=chunk)
    head.draws = 2
    emb, labels = batch()
    emb.requires_grad_(True)
    out = head(emb, labels)
    out.backward()

    weight = head.weight.detach().clone().requires_grad_(True)
    ref_emb = emb.detach().clone().requires_grad_(True)
    neighbours, neighbour_cos = reference_lookup(labels, *reference_table(weight, 8))
    rows = reference_select(neighbours, neighbour_cos, 0, C, RATE, 0.5, SEED, 2)
    mask = class_mask(torch.tensor(rows), B, C)
    cos = F.normalize(ref_emb, dim=1) @ F.normalize(weight, dim=1).T
    if loss == "d_softmax":
        ref = LF.d_softmax(cos, labels, 64.0, LOSSES.get("d_softmax").presets["end_point"], negatives_mask=mask)
    else:
        ref = LF.margin_softmax(cos, labels, 64.0, negatives_mask=mask, **LOSSES.get("arcface").margins)
    ref.backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.to_dense(), weight.grad, rtol=1e-4, atol=1e-5)
    assert head.last_num_negatives == len(rows) and ref_emb.grad.abs().sum() > 0


def test_the_table_is_built_at_the_first_draw_then_every_refresh_draws_and_not_in_eval(monkeypatch):
    built = []
    original = nearest.NearestTable.build
    monkeypatch.setattr(nearest.NearestTable, "build",
                        lambda self, head: (built.append(head.draws), original(self, head)))
    head = nearest_head(nearest_refresh=3)
    opt = build_head_optimizer(head, SGD)
    for step in range(8):
        if step == 4:
            head.eval()
            head(*batch(50))  # an eval forward: the table is due at draw 6 only, and eval never rebuilds
            head.train()
        head(*batch(step)).backward()
        opt.step()
        opt.zero_grad()
    assert built == [0, 3, 6]
    assert head.nearest.built_at == 6 and head.nearest.every == 3


def test_automatic_refresh_keeps_the_builds_a_tenth_of_the_sampled_gemms():
    assert nearest.auto_refresh(1000, 1000, 128, 1 / 8) == 209  # ceil(1000 * 1000 / (0.3 * 128 * 125))
    # a build, 2 C_local C D flops, over the interval is at most a tenth of a step's 6 B K_local D flops
    for c, c_local, b, r in ((1000, 1000, 128, 1 / 8), (10**6, 125_000, 1024, 1 / 64), (50, 50, 512, 1.0)):
        every, k = nearest.auto_refresh(c, c_local, b, r), num_sampled(c_local, r)
        assert 2 * c_local * c / every <= 0.1 * 6 * b * k * (1 + 1e-9)
    head = nearest_head()
    head(*batch())
    assert head.nearest.every == nearest.auto_refresh(C, C, B, RATE)


def _steps(head, opt, steps):
    losses = []
    for step in steps:
        loss = head(*batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_a_checkpoint_resumes_exactly_with_the_table_it_had(tmp_path):
    whole = nearest_head(nearest_refresh=3)
    whole_losses = _steps(whole, build_head_optimizer(whole, SGD), range(8))

    first = nearest_head(nearest_refresh=3)
    _steps(first, opt := build_head_optimizer(first, SGD), range(5))  # builds at draws 0 and 3
    save_head_checkpoint(str(tmp_path / "ckpt"), first, opt)
    resumed = nearest_head(nearest_refresh=3)
    load_head_checkpoint(str(tmp_path / "ckpt"), resumed, opt := build_head_optimizer(resumed, SGD))
    assert resumed.nearest.built_at == 3 and torch.equal(resumed.nearest.ids, first.nearest.ids)
    resumed_losses = _steps(resumed, opt, range(5, 8))  # rebuilds at draw 6, as the whole run did
    assert torch.equal(resumed_losses, whole_losses[5:])
    assert torch.equal(resumed.weight, whole.weight)


def test_a_checkpoint_without_a_table_builds_one_at_the_next_forward(tmp_path):
    other = ShardedClassifier(C, D, negatives="random", sample_rate=RATE, seed=SEED)
    other.draws = 4
    save_head_checkpoint(str(tmp_path / "ckpt"), other)
    head = nearest_head()
    head(*batch())  # a table from the head's own first weights
    load_head_checkpoint(str(tmp_path / "ckpt"), head)
    assert head.nearest.ids is None and head.draws == 4
    head(*batch(1))
    assert head.nearest.built_at == 4
    assert torch.equal(head.nearest.ids, reference_table(other.weight, 8)[0])


def test_nearest_keys_are_refused_where_they_would_not_be_read():
    with pytest.raises(ConfigError, match=r"head.nearest_share.*read only with head.negatives=nearest"):
        HeadConfig(negatives="random", nearest_share=0.25)
    with pytest.raises(ConfigError, match=r"head.nearest_refresh"):
        HeadConfig(negatives="nearest", nearest_refresh=-1)
    with pytest.raises(ConfigError, match=r"head.nearest_share"):
        HeadConfig(negatives="nearest", nearest_share=1.5)
    assert HeadConfig(negatives="nearest", nearest_per_class=4, nearest_refresh=100).nearest_per_class == 4
    with pytest.raises(ValueError, match=r"read only with negatives='nearest', not 'all'"):
        ShardedClassifier(C, D, nearest_per_class=4)
    with pytest.raises(ValueError, match=r"nearest_per_class=0 is invalid"):
        ShardedClassifier(C, D, negatives="nearest", nearest_per_class=0)
    with pytest.raises(ValueError, match=r"only the sharded head keeps; use dsoft_dist.ShardedClassifier"):
        DSoftmaxLoss(C, D, negatives="nearest")


def test_from_config_passes_the_nearest_keys():
    cfg = HeadConfig(negatives="nearest", sample_rate=0.25, nearest_share=0.75, nearest_per_class=3,
                     nearest_refresh=11)
    head = ShardedClassifier.from_config(cfg, C, D)
    table = head.nearest
    assert (table.share, table.per_class, table.refresh) == (0.75, 3, 11)
