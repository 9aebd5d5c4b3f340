"""16-bit embeddings and weights on the head's torch path, against float64 references (Liger-style table).

The head computes its statistics in fp32 whatever the inputs are; the embedding gradient
comes back in the embeddings' dtype and the weight gradient in the weight's dtype. The
reference is the single-process loss module in float64 on the same (rounded) values, so
the table's tolerances measure the head's own rounding: fp32 statistics, then one rounding
of each gradient to its dtype (bf16 keeps 8 significant bits, fp16 11).

    python -m pytest tests/test_head_dtypes.py
"""
from __future__ import annotations

import pytest
import torch

from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer, torch_local_shard_stats
from dsoft_dist.losses import DSoftmaxLoss, MarginSoftmaxLoss

# (embedding dtype, weight dtype, loss atol, gradient tolerance relative to the largest entry)
DTYPES = [
    (torch.float32, torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, torch.float32, 1e-5, 8e-3),
    (torch.float16, torch.float32, 1e-5, 1e-3),
    (torch.float32, torch.bfloat16, 1e-5, 8e-3),
    (torch.bfloat16, torch.bfloat16, 1e-5, 8e-3),
    (torch.float16, torch.float16, 1e-5, 1e-3),
]
SHAPES = [(7, 37, 5), (13, 101, 33), (32, 64, 16)]  # (B, C, D): odd sizes, chunks of 16 rows


def _module(loss, classes, dim, negatives):
    if loss == "d_softmax":
        return DSoftmaxLoss(classes, dim, negatives=negatives, sample_rate=0.3, seed=5).double()
    return MarginSoftmaxLoss.preset(loss, classes, dim, negatives=negatives, sample_rate=0.3, seed=5).double()


def _data(batch, classes, dim, emb_dtype, weight_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen).to(emb_dtype)
    weight = (torch.randn(classes, dim, generator=gen) * 0.05).to(weight_dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[0], labels[-1] = -1, classes - 1
    return emb, weight, labels


def _close(got, want, tol, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs diff {err:.3e} > {tol:.1e} x {scale:.3g}"


@pytest.mark.parametrize("emb_dtype,weight_dtype,loss_atol,grad_tol", DTYPES)
@pytest.mark.parametrize("batch,classes,dim", SHAPES)
@pytest.mark.parametrize("loss,negatives", [("d_softmax", "all"), ("d_softmax", "random"), ("arcface", "all"),
                                            ("cosface", "random")])
def test_loss_and_both_gradients_match_float64(loss, negatives, batch, classes, dim, emb_dtype, weight_dtype,
                                               loss_atol, grad_tol):
    emb, weight, labels = _data(batch, classes, dim, emb_dtype, weight_dtype)
    head = ShardedClassifier(classes, dim, loss=loss, negatives=negatives, sample_rate=0.3, seed=5, chunk_size=16,
                             dtype=weight_dtype)
    ref = _module(loss, classes, dim, negatives)
    with torch.no_grad():
        head.weight.copy_(weight)
        ref.weight.copy_(weight.double())
    e, e_ref = emb.clone().requires_grad_(True), emb.double().requires_grad_(True)
    got, want = head(e, labels), ref(e_ref, labels)
    got.backward()
    want.backward()
    what = f"{loss}/{negatives} B={batch} C={classes} D={dim} emb {emb_dtype} weight {weight_dtype}"
    assert got.dtype == torch.float32, f"{what}: the loss is {got.dtype}, not fp32"
    assert abs(got.item() - want.item()) <= loss_atol * max(1.0, abs(want.item())), f"{what}: loss {got} vs {want}"
    assert e.grad.dtype == emb_dtype and head.weight.grad.dtype == weight_dtype, f"{what}: gradient dtypes"
    _close(e.grad, e_ref.grad, grad_tol, f"{what}: embedding gradient")
    grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    _close(grad_w, ref.weight.grad, grad_tol, f"{what}: weight gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_local_statistics_are_fp32_for_16_bit_features(dtype):
    emb, weight, labels = _data(9, 40, 12, dtype, dtype)
    feats = torch.nn.functional.normalize(emb.float(), dim=1).to(dtype).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    valid = labels >= 0
    lse, target, hardest = torch_local_shard_stats(feats, w, None, torch.where(valid, labels, -1), valid, 64.0, True)
    assert lse.dtype == target.dtype == hardest.dtype == torch.float32
    (torch.where(valid, lse, 0.0).sum() + target.sum()).backward()
    assert feats.grad.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bf16_weights_train_with_the_optimizer_inside_backward(optimizer):
    """The row updates run on bf16 rows; the step equals the separate optimizer step on the same gradient."""
    results = []
    for in_backward in (False, True):
        emb, weight, labels = _data(16, 50, 8, torch.bfloat16, torch.bfloat16, seed=3)
        head = ShardedClassifier(50, 8, negatives="random", sample_rate=0.3, seed=5, chunk_size=8,
                                 dtype=torch.bfloat16)
        with torch.no_grad():
            head.weight.copy_(weight)
        opt = build_head_optimizer(head, OptimizerConfig(name=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                                         head_step_in_backward=in_backward))
        head(emb.requires_grad_(True), labels).backward()
        opt.step()
        results.append(head.weight.detach().clone())
    assert results[0].dtype == torch.bfloat16
    assert not torch.equal(results[0], _data(16, 50, 8, torch.bfloat16, torch.bfloat16, seed=3)[1])
    torch.testing.assert_close(results[1], results[0], rtol=1e-2, atol=1e-3)
