"""The head optimizer's step in backward (ShardedClassifier.step_in_backward) and the chunked backward's
target and sign handling, in one plain process. The multi-process runs are in tests/test_head_dist.py.

    python -m pytest tests/test_head_step_in_backward.py
"""
from __future__ import annotations

import pytest
import torch

from dsoft_dist.config import load_config
from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer
from dsoft_dist.head.backend import register_local_backend
from dsoft_dist.head.local import LocalShardStats, torch_local_shard_stats
from dsoft_dist.losses import NEGATIVES

C, D, B, STEPS = 29, 6, 10, 3
OPTIMIZERS = {"sgd": OptimizerConfig(name="sgd", lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01),
              "sgd_momentum": OptimizerConfig(name="sgd", lr=0.3, momentum=0.9, weight_decay=0.01),
              "sgd_plain": OptimizerConfig(name="sgd", lr=0.3, momentum=0.0, weight_decay=0.05),
              "adamw": OptimizerConfig(name="adamw", lr=0.02, weight_decay=0.1)}


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        emb, labels = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
        labels[0], labels[3], labels[5], labels[6] = -1, C - 1, 0, 0  # an ignored row and a repeated target
        out.append((emb, labels))
    return out


def _train(loss, neg, opt_name, chunk, in_backward, backend="auto", dtype=torch.float32):
    """STEPS steps; returns per step (loss, embedding grad, touched-row mask, weight) and the optimizer state."""
    head = ShardedClassifier(C, D, loss=loss, negatives=neg, sample_rate=0.3, chunk_size=chunk, seed=4,
                             init_std=0.5, backend=backend).to(dtype)
    cfg = OPTIMIZERS[opt_name]
    opt = build_head_optimizer(head, OptimizerConfig(**{**cfg.__dict__, "head_step_in_backward": in_backward}))
    steps = []
    for emb, labels in _batches():
        before = head.weight.detach().clone()
        emb = emb.to(dtype).requires_grad_(True)
        loss_value = head(emb, labels)
        loss_value.backward()
        grad = head.weight.grad
        touched = None
        if grad is not None:  # stepped after backward: the rows present in the gradient are the touched ones
            dense = grad.to_dense() if grad.is_sparse else grad
            touched = (grad.coalesce().indices()[0] if grad.is_sparse else torch.arange(C))
            assert dense.shape == (C, D)
        opt.step()
        opt.zero_grad()
        steps.append({"loss": loss_value.detach(), "grad_emb": emb.grad, "touched": touched, "before": before,
                      "weight": head.weight.detach().clone(), "grad_is_none": grad is None})
    state = {k: v.clone() for k, v in opt.state[head.weight].items()}
    return steps, state


def _plain_backend(*args, **kwargs):
    """A registered backend without row updates: the head must step from the weight gradient instead."""
    assert kwargs.get("row_update") is None
    return torch_local_shard_stats(*args, **kwargs)


register_local_backend("plain_for_tests", _plain_backend)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("neg", NEGATIVES)
@pytest.mark.parametrize("loss", ("d_softmax", "arcface", "softmax"))
def test_step_in_backward_equals_backward_then_step(loss, neg, opt_name):
    """Loss, embedding gradients, weights and optimizer state after 3 steps match the run stepped after backward,
    rows outside the touched set stay bit-identical, and no weight gradient is kept: on the torch
    chunked path (updates per chunk, chunked and not) and on a backend that returns a weight
    gradient (the update runs from the post-accumulate-grad hook). negatives="nearest" always steps from
    the hook, once its rows' gradients and those of each row's nearest classes have met in the weight's.

    In float64: the SGD in backward adds the same terms in another order (the chunk GEMM runs into
    the momentum), and after 3 steps at lr 0.3 both float32 runs sit ~1e-5 from the float64
    answer, so only float64 separates a wrong update from rounding."""
    tol = dict(rtol=1e-10, atol=1e-12)
    for chunk, backend in ((0, "auto"), (4, "auto"), (4, "plain_for_tests")):
        ref_steps, ref_state = _train(loss, neg, opt_name, chunk, in_backward=False, dtype=torch.float64)
        got_steps, got_state = _train(loss, neg, opt_name, chunk, in_backward=True, backend=backend, dtype=torch.float64)
        for ref, got in zip(ref_steps, got_steps):
            assert got["grad_is_none"] and not ref["grad_is_none"]
            torch.testing.assert_close(got["loss"], ref["loss"], **tol)
            torch.testing.assert_close(got["grad_emb"], ref["grad_emb"], **tol)
            torch.testing.assert_close(got["weight"], ref["weight"], **tol)
            untouched = torch.ones(C, dtype=torch.bool)
            untouched[ref["touched"]] = False
            assert torch.equal(got["weight"][untouched], got["before"][untouched])
        for name, value in ref_state.items():
            torch.testing.assert_close(got_state[name], value, **tol, msg=f"state {name}")


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_step_in_backward_in_float32_stays_within_rounding(opt_name):
    """The production dtype: one step in backward equals backward + step to float32 rounding."""
    for chunk in (0, 4):
        ref_steps, _ = _train("arcface", "all", opt_name, chunk, in_backward=False)
        got_steps, _ = _train("arcface", "all", opt_name, chunk, in_backward=True)
        torch.testing.assert_close(got_steps[0]["weight"], ref_steps[0]["weight"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_steps[0]["grad_emb"], ref_steps[0]["grad_emb"], rtol=1e-5, atol=1e-6)


def _dense_reference(features, weight, rows, target_local, scale, normalize):
    """lse over the columns minus the target, and the target cosine, by dense autograd in float64."""
    w = torch.nn.functional.normalize(weight, dim=1) if normalize else weight
    cols = torch.arange(weight.shape[0]) if rows is None else rows
    logits = scale * features @ w[cols].t()  # (B, K)
    is_target = cols[None, :] == target_local[:, None]
    lse = torch.logsumexp(logits.masked_fill(is_target, float("-inf")), dim=1)
    owned = target_local >= 0
    target = torch.where(owned, (features * w[target_local.clamp(min=0)]).sum(1), torch.zeros(len(owned),
                                                                                             dtype=features.dtype))
    return lse, target


@pytest.mark.parametrize("normalize", (True, False))
@pytest.mark.parametrize("sampled", (False, True))
def test_chunked_backward_with_signed_upstream_gradients(normalize, sampled):
    """Random signed d/d lse and d/d target (a loss may use either with either sign) give the dense
    float64 gradients, with targets inside chunks, outside the sampled columns, and repeated."""
    gen = torch.Generator().manual_seed(2)
    feats = torch.nn.functional.normalize(torch.randn(8, 5, generator=gen, dtype=torch.float64), dim=1)
    weight = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    target = torch.tensor([2, -1, 12, 0, 2, 7, 9, -1])
    rows = torch.tensor([0, 1, 2, 5, 9, 11]) if sampled else None  # targets 12 and 7 fall outside
    valid = torch.ones(8, dtype=torch.bool)
    scale = 3.0 if normalize else 1.0
    g_lse, g_tgt = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen,
                                                                                   dtype=torch.float64)
    f1, w1 = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lse, tgt, _ = LocalShardStats.apply(f1, w1, rows, target, valid, scale, normalize, 4, 0, None, None)
    ((lse * g_lse).sum() + (tgt * g_tgt).sum()).backward()
    f2, w2 = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want_lse, want_tgt = _dense_reference(f2, w2, rows, target, scale, normalize)
    ((want_lse * g_lse).sum() + (want_tgt * g_tgt).sum()).backward()
    torch.testing.assert_close(lse, want_lse.detach())
    torch.testing.assert_close(tgt, want_tgt.detach())
    torch.testing.assert_close(f1.grad, f2.grad)
    grad_w = w1.grad.to_dense() if w1.grad.is_sparse else w1.grad
    torch.testing.assert_close(grad_w, w2.grad)


@pytest.mark.parametrize("sampled", (False, True))
def test_a_row_below_eps_gets_the_gradient_of_f_normalize(sampled):
    """A class row of norm 1e-14, below F.normalize's eps (1e-12): w_hat = w / eps and gradient g / eps
    with no radial term, like the dense float64 autograd through F.normalize."""
    gen = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    weight[3] *= 1e-14 / weight[3].norm()
    target = torch.tensor([3, 1, -1, 7, 3, 10])
    rows = torch.tensor([0, 2, 3, 4, 8]) if sampled else None
    g_lse, g_tgt = torch.rand(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen,
                                                                                  dtype=torch.float64)
    f1, w1 = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lse, tgt, _ = LocalShardStats.apply(f1, w1, rows, target, torch.ones(6, dtype=torch.bool), 2.0, True, 4, 0, None, None)
    ((lse * g_lse).sum() + (tgt * g_tgt).sum()).backward()
    f2, w2 = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want_lse, want_tgt = _dense_reference(f2, w2, rows, target, 2.0, True)
    ((want_lse * g_lse).sum() + (want_tgt * g_tgt).sum()).backward()
    torch.testing.assert_close(lse, want_lse.detach())
    torch.testing.assert_close(f1.grad, f2.grad)
    grad_w = w1.grad.to_dense() if w1.grad.is_sparse else w1.grad
    assert grad_w[3].abs().max() > 1e6  # g / eps: the row is pushed off zero
    torch.testing.assert_close(grad_w, w2.grad, rtol=1e-7, atol=1e-6 * float(w2.grad.abs().max()))


def test_a_head_stepping_in_backward_refuses_a_second_backward():
    """The rows change during the first backward, so retain_graph + a second backward must fail loudly."""
    head = ShardedClassifier(C, D, chunk_size=4)
    build_head_optimizer(head, OptimizerConfig(head_step_in_backward=True))
    emb, labels = _batches()[0]
    loss = head(emb.clone().requires_grad_(True), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_step_in_backward_errors_name_the_fix():
    head = ShardedClassifier(C, D)
    dense = build_head_optimizer(head, OptimizerConfig(head_mode="dense"))
    with pytest.raises(ValueError, match="head_mode='sparse'"):
        head.step_in_backward(dense)
    other = build_head_optimizer(ShardedClassifier(C, D), OptimizerConfig())
    with pytest.raises(ValueError, match="does not hold this head's weight"):
        head.step_in_backward(other)
    with pytest.raises(ValueError, match="update_rows needs mode='sparse'"):
        dense.update_rows(head.weight, torch.zeros(2, D), start=0)


def test_step_in_backward_none_returns_to_weight_gradients():
    head = ShardedClassifier(C, D)
    opt = build_head_optimizer(head, OptimizerConfig(head_step_in_backward=True))
    emb, labels = _batches()[0]
    head(emb, labels).backward()
    assert head.weight.grad is None
    head.step_in_backward(None)
    head(emb, labels).backward()
    assert head.weight.grad is not None and head.weight.grad.shape == (C, D)
    opt.step()


@pytest.mark.parametrize("negatives", ["all", "random"])
def test_a_dropped_head_and_its_optimizer_are_freed(negatives):
    """The optimizer's hook sits in the weight's C++ hook table, which the garbage collector cannot see
    into: it must not keep the optimizer, the weight and its momentum alive after both are dropped
    (a sweep building heads one after another in one process grew by each head's state)."""
    import gc
    import weakref

    head = ShardedClassifier(C, D, negatives=negatives, sample_rate=0.5)
    opt = build_head_optimizer(head, OptimizerConfig(head_step_in_backward=True))
    emb, labels = _batches()[0]
    head(emb.clone().requires_grad_(True), labels).backward()
    alive = [weakref.ref(x) for x in (head, opt, head.weight)]
    del head, opt
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True, True]


def test_config_head_step_in_backward_needs_sparse_mode(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  head_mode: dense\n  head_step_in_backward: true\n")
    with pytest.raises(ValueError, match="optimizer.head_step_in_backward.*head_mode=sparse"):
        load_config(str(path))


@pytest.mark.parametrize("neg", ("all", "random"))
def test_step_in_backward_with_the_triton_backend(neg):
    """backend='triton' (Triton's interpreter on CPU) + step_in_backward equals the torch path's backward + step."""
    pytest.importorskip("triton")
    ref_steps, _ = _train("arcface", neg, "sgd", 0, in_backward=False)
    got_steps, _ = _train("arcface", neg, "sgd", 0, in_backward=True, backend="triton")
    for ref, got in zip(ref_steps, got_steps):
        assert got["grad_is_none"]
        torch.testing.assert_close(got["weight"], ref["weight"], rtol=1e-4, atol=1e-5)


def test_a_frozen_head_is_not_stepped():
    """requires_grad=False on the weight: backward reaches the embeddings, the rows stay as they are."""
    head = ShardedClassifier(C, D, chunk_size=4)
    build_head_optimizer(head, OptimizerConfig(head_step_in_backward=True))
    head.weight.requires_grad_(False)
    before = head.weight.detach().clone()
    emb, labels = _batches()[0]
    emb = emb.clone().requires_grad_(True)
    head(emb, labels).backward()
    assert emb.grad is not None and torch.equal(head.weight, before)
