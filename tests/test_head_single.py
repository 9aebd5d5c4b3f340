"""ShardedClassifier in one plain process (no torch.distributed): equals the loss modules, properties, errors.

    python -m pytest tests/test_head_single.py
"""
from __future__ import annotations

import pytest
import torch

from dsoft_dist.config.schema import HeadConfig
from dsoft_dist.head import ShardedClassifier, auto_chunk_size, init_shard_weight
from dsoft_dist.head.local import LocalShardStats
from dsoft_dist.losses import MODES, DSoftmaxLoss, MarginSoftmaxLoss

C, D, B = 29, 6, 10
LOSSES = ("d_softmax", "arcface", "cosface", "sphereface", "normface", "softmax")


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb, labels = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
    labels[0], labels[3], labels[5] = -1, C - 1, 0
    return emb, labels


def _close(got, want):
    """fp32 agreement relative to the tensor's scale: logits of size s = 64 carry ~64 * 2^-23 ~ 8e-6
    absolute rounding, and 1/|w| makes weight gradients ~1e3, so atol is 1e-5 of the largest entry."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


def _module(loss, neg, corr=False):
    if loss == "d_softmax":
        return DSoftmaxLoss(C, D, negatives=neg, sample_rate=0.25, seed=5, inter_correction=corr)
    return MarginSoftmaxLoss.preset(loss, C, D, negatives=neg, sample_rate=0.25, seed=5)


@pytest.mark.parametrize("neg", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_single_process_module_over_steps(loss, neg):
    """World size 1: loss, both gradients and diagnostics equal the module's, over 3 training steps."""
    ref = _module(loss, neg)
    head = ShardedClassifier(C, D, loss=loss, negatives=neg, sample_rate=0.25, seed=5, chunk_size=4)
    with torch.no_grad():
        head.weight.copy_(ref.weight)
    for step in range(3):
        emb, labels = _data(step)
        e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        got, want = head(e1, labels), ref(e2, labels)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        _close(e1.grad, e2.grad)
        _close(head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad, ref.weight.grad)
        for key, value in ref.diagnostics().items():
            assert head.diagnostics()[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        head.weight.grad = ref.weight.grad = None
    assert head.draws == 3


def test_inter_correction_matches_module():
    ref, head = _module("d_softmax", "random", corr=True), ShardedClassifier(
        C, D, negatives="random", sample_rate=0.25, seed=5, inter_correction=True)
    with torch.no_grad():
        head.weight.copy_(ref.weight)
    emb, labels = _data()
    torch.testing.assert_close(head(emb, labels), ref(emb, labels), rtol=1e-5, atol=1e-5)


def test_sampled_gradient_touches_only_selected_rows_and_targets():
    head = ShardedClassifier(1000, D, negatives="random", sample_rate=0.01, seed=1)
    emb, labels = torch.randn(B, D, requires_grad=True), torch.randint(0, 1000, (B,))
    rows = head.select_rows(labels)
    head(emb, labels).backward()
    assert head.weight.grad.is_sparse
    grad = head.weight.grad.coalesce()
    expected = torch.unique(torch.cat([rows, labels]))
    assert torch.equal(grad.indices()[0], expected)
    assert grad.values().shape == (expected.numel(), D)


def test_eval_mode_does_not_advance_the_draws_and_caller_tensors_are_untouched():
    head = ShardedClassifier(C, D, negatives="random", sample_rate=0.5).eval()
    emb, labels = _data()
    emb_copy, labels_copy = emb.clone(), labels.clone()
    first = head(emb, labels)
    assert head.draws == 0 and torch.equal(head(emb, labels), first)
    assert torch.equal(emb, emb_copy) and torch.equal(labels, labels_copy)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradient():
    head = ShardedClassifier(C, D, negatives="batch")
    emb = torch.randn(4, D, requires_grad=True)
    loss = head(emb, torch.full((4,), -1, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(emb.grad) == 0


def test_local_stats_gradcheck_float64():
    """The closed-form chunked backward equals numerical differentiation (normalized and linear)."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=1)
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([2, -1, 8, 0, -1])
    valid = torch.tensor([True, True, True, True, False])
    for normalize, scale in ((True, 3.0), (False, 1.0)):
        def fn(f, w):
            lse, tgt, _ = LocalShardStats.apply(f, w, None, target, valid, scale, normalize, 4, 0, None, None)
            return torch.where(valid, lse, torch.zeros_like(lse)), tgt
        assert torch.autograd.gradcheck(fn, (feats.clone().requires_grad_(), weight.clone().requires_grad_()))


def test_init_is_independent_of_the_sharding():
    full = init_shard_weight(10000, 4, 0, 10000, seed=3)
    for start, count in ((0, 3334), (3334, 3333), (6667, 3333), (4095, 2)):
        assert torch.equal(init_shard_weight(10000, 4, start, count, seed=3), full[start:start + count])
    assert not torch.equal(init_shard_weight(10000, 4, 0, 10000, seed=4), full)


def test_from_config_uses_presets_and_overrides():
    arc = ShardedClassifier.from_config(HeadConfig(loss="arcface", chunk_size=8), 50, 4)
    assert (arc.m1, arc.m2, arc.m3, arc.chunk_size) == (1.0, 0.5, 0.0, 8)
    custom = ShardedClassifier.from_config(HeadConfig(loss="arcface", m2=0.3), 50, 4)
    assert custom.m2 == 0.3
    margin = ShardedClassifier.from_config(HeadConfig(loss="margin", m1=1.0, m2=0.2, m3=0.1), 50, 4)
    assert (margin.m2, margin.m3) == (0.2, 0.1)
    assert ShardedClassifier.from_config(HeadConfig(loss="softmax", scale=32.0), 50, 4).scale == 1.0


def test_auto_chunk_bounds_the_logit_block():
    assert auto_chunk_size(512) == (1 << 20) // 512 and auto_chunk_size(512, device="cuda") == (1 << 24) // 512
    assert auto_chunk_size(1 << 16) == 256  # never narrower than 256 columns
    assert auto_chunk_size(512, 100) == 100


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, C]), f"labels on rank 0 contain {C}, outside \\[0, {C}\\)"),
    (torch.tensor([0, -2]), "contain -2"),
    (torch.tensor([0, 1], dtype=torch.int32), "int64"),
    (torch.tensor([0, 1, 2]), "one label per embedding row"),
])
def test_bad_labels_raise_clear_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        ShardedClassifier(C, D)(torch.randn(2, D), labels)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="triplet"), "loss='triplet' is invalid"),
    (dict(negatives="hard"), "negatives='hard' is invalid"),
    (dict(sample_rate=0.0), "sample_rate=0.0 is invalid"),
    (dict(chunk_size=-1), "chunk_size=-1 is invalid"),
    (dict(backend="cuda-magic"), "backend='cuda-magic' is not available"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardedClassifier(C, D, **kwargs)


def test_wrong_embedding_size_names_value_and_fix():
    with pytest.raises(ValueError, match="have dim 5, but the head's embedding_size is 6"):
        ShardedClassifier(C, D)(torch.randn(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("neg", ["all", "random"])
@pytest.mark.parametrize("loss", ["d_softmax", "arcface", "softmax"])
def test_logit_cache_gives_the_same_loss_and_gradients(loss, neg):
    """Backward from cached exp'd chunks (all or some of them) equals the recompute path."""
    emb, labels = _data(4)
    results = []
    one_chunk_mb = 1.5 * B * 4 * 4 / 2 ** 20  # a chunk holds B x 4 float32 logits
    for cache_mb in (0.0, one_chunk_mb, 10.0):  # none, the first chunk only, all chunks
        head = ShardedClassifier(C, D, loss=loss, negatives=neg, sample_rate=0.5, chunk_size=4, seed=2,
                                 logit_cache_mb=cache_mb)
        e = emb.clone().requires_grad_(True)
        loss_value = head(e, labels)
        loss_value.backward()
        grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
        results.append((loss_value.detach(), e.grad, grad_w))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


def test_logit_cache_refuses_a_second_backward():
    head = ShardedClassifier(C, D, chunk_size=4, logit_cache_mb=10.0)
    emb, labels = _data()
    loss = head(emb.requires_grad_(True), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
