"""negatives="nearest" (D-Softmax-KN) in one process: its table of nearest classes against the full (C, C) cosine
product, the head's loss and gradients against the functional loss over each row's weighted set written out, the
weighted sum against the full one over many draws, the table's build schedule, and a checkpoint that resumes
exactly with the table it had.

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
from dsoft_dist.losses.negatives import draw_seed, num_sampled, sample_without_replacement, select_shard_classes
from dsoft_dist.parallel import shard_ranges
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


def reference_lookup(labels, ids):
    """(B, M) rows of the table's ids for each label; -1 for an ignored row."""
    rows = ids[labels.clamp(min=0)].clone()
    rows[labels < 0] = -1
    return rows


def reference_row_bias(labels, neighbours, parts, world_size, num_classes=C) -> torch.Tensor:
    """(B, C) log weights of each row's negatives, written out: 0 on the nearest classes of its class, log((C_p -
    [y_i on p] - |N_i^p|) / |R_i^p|) on shard p's random rows R_i^p outside those and y_i, -inf elsewhere.

    parts: each shard's random rows (local ids), as D-Softmax-K draws them."""
    bias = torch.full((labels.shape[0], num_classes), -math.inf, dtype=torch.float64)
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        near = {c for c in neighbours[i].tolist() if c >= 0}
        for (start, count), part in zip(shard_ranges(num_classes, world_size), parts):
            mine = {c for c in near if start <= c < start + count}
            random = [start + c for c in part.tolist() if start + c not in mine and start + c != y]
            others = count - (start <= y < start + count) - len(mine)
            for c in mine:
                bias[i, c] = 0.0
            for c in random:
                bias[i, c] = math.log(others / len(random))
    return bias


def reference_nearest_loss(loss, emb, weight, labels, bias, scale=64.0):
    """The loss over each row's weighted negatives (``reference_row_bias``), from the functional losses' parts."""
    valid, rows = labels >= 0, torch.arange(labels.shape[0])
    mask = torch.isfinite(bias)
    bias = torch.where(mask, bias, torch.zeros_like(bias)).to(emb.dtype)
    if loss == "softmax":
        logits = emb @ weight.T
        return LF.margin_softmax_from_parts(logits[rows, labels.clamp(min=0)], logits + bias, mask, valid=valid)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    z = cos[rows, labels.clamp(min=0)]
    if loss == "d_softmax":  # s (cos + bias / s) = s cos + bias: the weight enters the inter sum
        return LF.d_softmax_from_parts(z, cos + bias / scale, mask, scale, LOSSES.get(loss).presets["end_point"],
                                       valid=valid)
    target = scale * LF.margin_target(z, **LOSSES.get(loss).margins)
    return LF.margin_softmax_from_parts(target, scale * cos + bias, mask, valid=valid)


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


@pytest.mark.parametrize("loss", ["d_softmax", "arcface", "softmax"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_loss_and_gradients_match_the_functional_loss_over_each_rows_weighted_set(loss, chunk):
    head = nearest_head(loss=loss, chunk_size=chunk)
    head.draws = 2
    emb, labels = batch()
    emb.requires_grad_(True)
    out = head(emb, labels)
    out.backward()

    weight = head.weight.detach().clone().requires_grad_(True)
    ref_emb = emb.detach().clone().requires_grad_(True)
    neighbours = reference_lookup(labels, reference_table(weight, 8)[0])
    random = select_shard_classes("random", labels, 0, C, RATE, SEED, 2)
    ref = reference_nearest_loss(loss, ref_emb, weight, labels, reference_row_bias(labels, neighbours, [random], 1))
    ref.backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.to_dense(), weight.grad, rtol=1e-4, atol=1e-5)
    touched = head.weight.grad.coalesce().indices()[0]
    near = neighbours[labels >= 0].flatten()
    assert set(touched.tolist()) == set(random.tolist()) | set(near.tolist()) | set(labels[labels >= 0].tolist())
    assert head.last_num_negatives == random.numel() and ref_emb.grad.abs().sum() > 0


def test_the_weighted_sum_is_an_unbiased_estimate_of_the_full_one():
    """Over many draws, exp(lse) averages to the shard's sum over every class but the target (each row's nearest
    classes exactly, the random rows standing for the rest); without the weights it would fall short by about r."""
    torch.manual_seed(0)
    count, start, b, m = 60, 30, 6, 5
    feats = F.normalize(torch.randn(b, D, dtype=torch.float64), dim=1)
    weight = torch.randn(count, D, dtype=torch.float64)
    targets = torch.tensor([3, -1, 59, 10, -1, 0])  # local rows, -1: another shard's class
    neighbours = torch.stack([torch.randperm(120)[:m] for _ in range(b)])  # global ids; those in [30, 90) are here
    neighbours[neighbours == start + targets[:, None]] = -1  # the table never names a row's own class
    logits = feats @ F.normalize(weight, dim=1).T  # scale 1: the draws vary less
    full = logits.exp().sum(dim=1) - torch.where(targets >= 0, logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
                                                 .exp(), torch.zeros(b, dtype=torch.float64))
    estimates = []
    for draw in range(300):
        rows = sample_without_replacement(count, 8, draw_seed(1, draw))
        taken = torch.zeros(b, count, dtype=torch.bool)
        taken[:, rows] = True
        taken[targets >= 0, targets[targets >= 0]] = False
        lse = torch.logsumexp(logits.masked_fill(~taken, -math.inf), dim=1)
        with torch.no_grad():
            lse, _ = nearest.with_nearest_rows(lse, logits.amax(1), feats, weight, neighbours, rows, targets, 1.0,
                                               start)
        estimates.append(lse.exp())
    torch.testing.assert_close(torch.stack(estimates).mean(dim=0), full, rtol=0.02, atol=0)


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


def test_inter_correction_is_refused_with_nearest():
    with pytest.raises(ConfigError, match=r"head.inter_correction.*not read with head.negatives=nearest"):
        HeadConfig(negatives="nearest", sample_rate=0.25, inter_correction=True)
    with pytest.raises(ValueError, match=r"inter_correction=True is invalid with negatives='nearest'"):
        ShardedClassifier(C, D, negatives="nearest", sample_rate=0.25, inter_correction=True)


def test_nearest_keys_are_refused_where_they_would_not_be_read():
    with pytest.raises(ConfigError, match=r"head.nearest_per_class.*read only with head.negatives=nearest"):
        HeadConfig(negatives="random", nearest_per_class=4)
    with pytest.raises(ConfigError, match=r"head.nearest_refresh"):
        HeadConfig(negatives="nearest", nearest_refresh=-1)
    with pytest.raises(ConfigError, match=r"head.nearest_per_class"):
        HeadConfig(negatives="nearest", nearest_per_class=0)
    assert HeadConfig(negatives="nearest", nearest_per_class=4, nearest_refresh=100).nearest_per_class == 4
    with pytest.raises(ValueError, match=r"read only with negatives='nearest', not 'all'"):
        ShardedClassifier(C, D, nearest_per_class=4)
    with pytest.raises(ValueError, match=r"nearest_per_class=0 is invalid"):
        ShardedClassifier(C, D, negatives="nearest", nearest_per_class=0)
    with pytest.raises(ValueError, match=r"only the sharded head keeps; use dsoft_dist.ShardedClassifier"):
        DSoftmaxLoss(C, D, negatives="nearest")


def test_from_config_passes_the_nearest_keys():
    cfg = HeadConfig(negatives="nearest", sample_rate=0.25, nearest_per_class=3, nearest_refresh=11)
    head = ShardedClassifier.from_config(cfg, C, D)
    assert (head.nearest.per_class, head.nearest.refresh) == (3, 11)
