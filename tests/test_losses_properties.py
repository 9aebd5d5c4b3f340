"""Properties of the dissected softmax and of negative-set selection."""
import math

import pytest
import torch

from dsoft_dist.losses import (
    class_mask,
    d_softmax,
    d_softmax_terms,
    num_sampled,
    sample_without_replacement,
    select_classes,
    select_shard_classes,
)


def _setup(b=6, c=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(b, c, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, c, (b,), generator=g)
    return cos, y


def test_inter_term_does_not_depend_on_target_cosine():
    cos, y = _setup()
    intra0, inter0 = d_softmax_terms(cos, y, 64.0, 0.9)
    moved = cos.clone()
    moved[torch.arange(6), y] = torch.linspace(-0.9, 0.9, 6, dtype=torch.float64)
    intra1, inter1 = d_softmax_terms(moved, y, 64.0, 0.9)
    assert torch.equal(inter0, inter1)
    assert not torch.equal(intra0, intra1)


def test_intra_term_does_not_depend_on_negatives():
    cos, y = _setup()
    intra0, inter0 = d_softmax_terms(cos, y, 64.0, 0.9)
    noise = torch.rand_like(cos) * 2 - 1
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[torch.arange(6), y] = True
    moved = torch.where(target, cos, noise)
    intra1, inter1 = d_softmax_terms(moved, y, 64.0, 0.9)
    assert torch.equal(intra0, intra1)
    assert not torch.equal(inter0, inter1)


def test_intra_gradient_vanishes_as_target_rises_above_end_point():
    d, s = 0.5, 64.0
    grads = []
    for z in (0.3, 0.5, 0.6, 0.7, 0.9):
        cos = torch.zeros(1, 4, dtype=torch.float64)
        cos[0, 0] = z
        cos.requires_grad_()
        intra, _ = d_softmax_terms(cos, torch.tensor([0]), s, d)
        (g,) = torch.autograd.grad(intra.sum(), cos)
        grads.append(abs(float(g[0, 0])))
    assert grads == sorted(grads, reverse=True)
    assert grads[0] > 0.9 * s  # below d: nearly the full push
    assert grads[-1] < 1e-9 * s  # 0.4 above d: sigmoid(-25.6) ~ 7.6e-12


def test_inter_gradient_does_not_push_target():
    cos, y = _setup()
    cos.requires_grad_()
    _, inter = d_softmax_terms(cos, y, 64.0, 0.9)
    (g,) = torch.autograd.grad(inter.sum(), cos)
    assert torch.all(g[torch.arange(6), y] == 0)


def test_random_with_rate_one_equals_all():
    cos, y = _setup()
    idx = select_classes("random", y, 20, 1.0, seed=3, draw=5)
    assert torch.equal(idx, torch.arange(20))
    full = d_softmax(cos, y, 64.0, 0.9)
    sampled = d_softmax(cos, y, 64.0, 0.9, negatives_mask=class_mask(idx, 6, 20))
    assert torch.equal(full, sampled)


def test_batch_mode_uses_exactly_the_batch_classes():
    y = torch.tensor([5, 2, 5, -1, 9, 2])
    assert select_classes("batch", y, 12).tolist() == [2, 5, 9]
    cos, _ = _setup(6, 12)
    mask = class_mask(select_classes("batch", y, 12), 6, 12)
    cos2 = cos.clone()
    cos2[:, [0, 1, 3, 4, 6, 7, 8, 10, 11]] = 0.99  # classes outside the batch must not matter
    a = d_softmax(cos, y, 32.0, 0.9, negatives_mask=mask)
    b = d_softmax(cos2, y, 32.0, 0.9, negatives_mask=mask)
    assert torch.equal(a, b)


def test_same_seed_same_negatives_and_fresh_each_step():
    y = torch.tensor([1, 2, 3])
    a = select_classes("random", y, 100_000, 0.01, seed=7, draw=3)
    b = select_classes("random", y, 100_000, 0.01, seed=7, draw=3)
    c = select_classes("random", y, 100_000, 0.01, seed=7, draw=4)
    d = select_classes("random", y, 100_000, 0.01, seed=8, draw=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert a.numel() == 1000 and torch.unique(a).numel() == 1000


def test_sampling_is_uniform():
    counts = torch.zeros(50)
    for trial in range(4000):
        counts[sample_without_replacement(50, 5, trial)] += 1
    expected = 4000 * 5 / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90.0  # 49 dof: p ~ 3e-4 at 90


def test_sampling_with_exclusions_is_uniform_over_the_rest():
    exclude = torch.tensor([0, 7, 8, 31, 49])
    counts = torch.zeros(50)
    for trial in range(4000):
        idx = sample_without_replacement(50, 5, trial, exclude=exclude)
        assert idx.numel() == 5 and torch.unique(idx).numel() == 5 and torch.equal(idx, idx.sort().values)
        counts[idx] += 1
    assert counts[exclude].sum() == 0
    rest = counts[torch.isin(torch.arange(50), exclude, invert=True)]
    expected = 4000 * 5 / 45
    chi2 = float(((rest - expected) ** 2 / expected).sum())
    assert chi2 < 85.0  # 44 dof: p ~ 2e-4 at 85


def test_sampling_is_cheap_for_millions_of_classes():
    idx = sample_without_replacement(50_000_000, 1000, 0)  # a randperm would allocate 400 MB
    assert idx.numel() == 1000 and torch.unique(idx).numel() == 1000 and int(idx.max()) < 50_000_000


def test_partial_keeps_every_positive_and_fills_to_k():
    y = torch.tensor([3, 17, 3, 40, -1])
    idx = select_classes("partial", y, 100, 0.1, seed=1, draw=2)
    assert idx.numel() == num_sampled(100, 0.1) == 10
    assert set([3, 17, 40]) <= set(idx.tolist())
    many = torch.arange(30)
    assert select_classes("partial", many, 100, 0.1).numel() == 30  # positives beyond K are all kept


def test_shard_selection_reassembles_for_any_world_size():
    y = torch.tensor([0, 36, 12, 12, -1, 20])
    for world in (1, 2, 3, 4):
        parts = []
        for rank in range(world):
            n = 37 // world + (rank < 37 % world)
            start = (37 // world) * rank + min(rank, 37 % world)
            local = select_shard_classes("batch", y, start, n)
            assert all(0 <= i < n for i in local.tolist())
            parts.append(local + start)
        assert torch.cat(parts).tolist() == [0, 12, 20, 36]


def test_unknown_mode_and_rate_are_clear_errors():
    with pytest.raises(ValueError, match="negatives='everything'"):
        select_classes("everything", torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="sample_rate=0"):
        num_sampled(10, 0)
    assert num_sampled(10, 1.0) == 10 and num_sampled(1_000_000, 1 / 64) == math.ceil(1_000_000 / 64)
