"""The triton backend's shard-statistics kernels vs the torch chunked backend and a dense float64 reference.

Runs the Triton kernels in Triton's CPU interpreter when there is no GPU (set below, before
Triton is imported), so CI proves the kernels' math on CPU:

    python -m pytest tests/test_kernels_shard_stats.py

Every case compares lse, target, max, grad features and grad weight (densified), over
(dtype, atol, rtol) x odd shapes x negatives (all rows / sampled / sampled with owned
targets / none) x normalize, with ignored rows in every batch.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dsoft_dist.kernels import KernelConfig, triton_local_shard_stats  # noqa: E402

from dsoft_dist.head.local import torch_local_shard_stats  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 64.0
# (dtype, atol, rtol) for the stats and for the gradients (relative to the largest entry).
# Low-precision GEMM products are exact in fp32, so the stats stay near fp32 accuracy;
# the backward rounds dL/dlogit to the operand dtype before its GEMMs (as on tensor cores).
DTYPES = [(torch.float32, 2e-5, 1e-5, 2e-5), (torch.float16, 1e-4, 5e-5, 4e-3), (torch.bfloat16, 1e-4, 5e-5, 3e-2)]
# (B, C_local, D, config): B, C, D off the tiles; splits > 1 exercise the partial combines.
SHAPES = [
    (37, 101, 40, KernelConfig(block_m=32, block_n=64, block_k=32, bwd_block_m=32, bwd_block_n=32,
                               block_d=32, col_splits=2, feature_splits=2)),
    (20, 13, 24, KernelConfig(block_m=16, block_n=16, block_k=16, bwd_block_m=16, bwd_block_n=16,
                              col_splits=1, feature_splits=1)),
    (64, 300, 72, None),  # the interpreter default config: one split, whole D in one slice
]
NEGATIVES = ("all", "sampled", "sampled_with_targets", "none")


def make_case(batch, classes, dim, dtype, negatives, seed=0):
    """features (B, D) unit rows, raw weight (C, D), rows, target_local (B,), valid (B,) with ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(dtype)
    weight = (torch.randn(classes, dim, generator=gen) * 0.3).to(dtype)
    target = torch.randint(0, classes, (batch,), generator=gen)
    target[torch.rand(batch, generator=gen) < 0.3] = -1  # not owned by this shard
    valid = torch.rand(batch, generator=gen) > 0.15
    valid[0], target[0] = False, -1  # an ignored row
    target[1], target[2] = classes - 1, 0  # both edge rows of the shard (the tail tile, the first column)
    perm = torch.randperm(classes, generator=gen)
    owned = set(target[target >= 0].tolist())
    if negatives == "all":
        rows = None
    elif negatives == "none":
        rows = torch.zeros(0, dtype=torch.int64)
    elif negatives == "sampled":  # no owned target among the negatives
        rows = torch.tensor([r for r in perm.tolist() if r not in owned][: classes // 3 + 1], dtype=torch.int64)
    else:
        rows = perm[: classes // 2]
        rows = torch.unique(torch.cat([rows, target[target >= 0][:3]]))
    rows = None if rows is None else torch.sort(rows).values.to(DEVICE)
    return feats.to(DEVICE), weight.to(DEVICE), rows, target.to(DEVICE), valid.to(DEVICE)


def dense_reference(feats, weight, rows, target, valid, scale, normalize):
    """Full (B, C) logits in float64 with autograd: (lse, target, max) and a function for the gradients."""
    f = feats.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    w_hat = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else w
    cos = f @ w_hat.t()  # (B, C)
    cols = torch.arange(w.shape[0], device=w.device)
    in_rows = torch.ones_like(cols, dtype=torch.bool) if rows is None else torch.isin(cols, rows)
    neg = in_rows[None, :] & (cols[None, :] != target[:, None]) & valid[:, None]
    logits = torch.where(neg, scale * cos, torch.full_like(cos, float("-inf")))
    lse = torch.logsumexp(logits, dim=1)
    tgt = torch.where(target >= 0, cos.gather(1, target.clamp(min=0)[:, None])[:, 0], torch.zeros_like(lse))
    return f, w, lse, tgt, logits.amax(dim=1)


def run_backend(fn, feats, weight, rows, target, valid, normalize, g_lse, g_tgt, **kwargs):
    """(lse, target, max, grad f, dense grad w) of one backend with upstream gradients (g_lse, g_tgt)."""
    f = feats.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lse, tgt, hardest = fn(f, w, rows, target, valid, SCALE, normalize, **kwargs)
    loss = (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * g_lse).sum() + (tgt * g_tgt).sum()
    loss.backward()
    grad_w = w.grad.to_dense() if w.grad.is_sparse else w.grad
    return lse, tgt, hardest, f.grad, grad_w


def _assert_close(name, got, want, atol, rtol):
    scale = max(1.0, want.abs().nan_to_num(posinf=0.0, neginf=0.0).max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}C{s[1]}D{s[2]}")
@pytest.mark.parametrize("dtype, atol, rtol, grad_tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_dense_reference_and_torch_backend(dtype, atol, rtol, grad_tol, shape, negatives, normalize):
    batch, classes, dim, cfg = shape
    feats, weight, rows, target, valid = make_case(batch, classes, dim, dtype, negatives)
    gen = torch.Generator().manual_seed(1)
    g_lse, g_tgt = (torch.randn(batch, generator=gen).to(DEVICE) for _ in range(2))
    got = run_backend(triton_local_shard_stats, feats, weight, rows, target, valid, normalize, g_lse, g_tgt,
                      config=cfg)
    f, w, lse, tgt, hardest = dense_reference(feats, weight, rows, target, valid, SCALE, normalize)
    loss = (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * g_lse.double()).sum()
    (loss + (tgt * g_tgt.double()).sum()).backward()
    want = (lse.detach(), tgt.detach(), hardest.detach(), f.grad, w.grad)
    names = ("lse", "target", "max", "grad features", "grad weight")
    dtypes = (torch.float32, torch.float32, torch.float32, feats.dtype, weight.dtype)
    for name, a, b, want_dtype in zip(names, got, want, dtypes):
        assert a.dtype == want_dtype, f"{name} dtype {a.dtype} != {want_dtype}"
        tol = (atol, rtol) if name in ("lse", "target", "max") else (grad_tol, grad_tol)
        _assert_close(name, a, b, *tol)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(lse)), "rows without negatives must give lse = -inf"
    if dtype == torch.float32:  # the torch chunked backend is the head's reference: agree with it too
        ref = run_backend(torch_local_shard_stats, feats, weight, rows, target, valid, normalize, g_lse, g_tgt,
                          chunk_size=17)
        for name, a, b in zip(names, got, ref):
            _assert_close(f"{name} vs torch backend", a, b, atol, 1e-4)


@pytest.mark.parametrize("negatives", ["all", "sampled_with_targets"])
def test_gradient_dtypes_and_sparse_layout_match_the_torch_backend(negatives):
    """grad f in the features dtype, grad w in the weight dtype; sampled: COO over rows U owned targets (the kernels'
    coalesced; the torch path's uncoalesced, with fixed-size target slots, and the same once coalesced)."""
    feats, weight, rows, target, valid = make_case(37, 101, 40, torch.float32, negatives)
    weight = weight.to(torch.bfloat16)
    out = []
    for fn in (triton_local_shard_stats, torch_local_shard_stats):
        f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lse, tgt, _ = fn(f, w, rows, target, valid, SCALE, True)
        loss = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum() + tgt.sum()
        out.append(torch.autograd.grad(loss, (f, w)))  # as returned by backward (AccumulateGrad may copy)
    (gf, gw), (rf, rw) = out
    assert gf.dtype == rf.dtype == torch.float32 and gw.dtype == rw.dtype == torch.bfloat16
    assert gw.is_sparse == rw.is_sparse == (rows is not None)
    if rows is not None:
        assert gw.is_coalesced() and torch.equal(gw.indices(), rw.coalesce().indices())
        owned = target[target >= 0]
        assert torch.equal(gw.indices()[0], torch.unique(torch.cat([rows, owned])))


def test_all_rows_ignored_gives_minus_inf_and_zero_gradients():
    feats, weight, rows, target, valid = make_case(20, 50, 24, torch.float32, "all")
    valid = torch.zeros_like(valid)
    target = torch.full_like(target, -1)
    lse, tgt, hardest, gf, gw = run_backend(triton_local_shard_stats, feats, weight, rows, target, valid, True,
                                            torch.ones(20, device=DEVICE), torch.ones(20, device=DEVICE))
    assert torch.isneginf(lse).all() and torch.isneginf(hardest).all() and torch.count_nonzero(tgt) == 0
    assert torch.count_nonzero(gf) == 0 and torch.count_nonzero(gw) == 0


def test_results_do_not_depend_on_the_tiling():
    """Splits, tile sizes and D slices change only the summation order (fp32 rounding)."""
    feats, weight, rows, target, valid = make_case(37, 101, 40, torch.float32, "sampled_with_targets")
    g = torch.linspace(-1, 1, 37, device=DEVICE)
    base = run_backend(triton_local_shard_stats, feats, weight, rows, target, valid, True, g, g,
                       config=KernelConfig(col_splits=1, feature_splits=1))
    other = run_backend(triton_local_shard_stats, feats, weight, rows, target, valid, True, g, g,
                        config=KernelConfig(block_m=16, block_n=16, block_k=16, block_d=16, bwd_block_m=16,
                                            bwd_block_n=16, col_splits=3, feature_splits=4))
    for a, b in zip(base, other):
        _assert_close("tiling", a, b, 1e-5, 1e-5)


def test_caller_tensors_are_not_modified():
    feats, weight, rows, target, valid = make_case(20, 50, 24, torch.float32, "sampled")
    copies = [t.clone() for t in (feats, weight, rows, target, valid)]
    run_backend(triton_local_shard_stats, feats, weight, rows, target, valid, True,
                torch.ones(20, device=DEVICE), torch.ones(20, device=DEVICE))
    for before, after in zip(copies, (feats, weight, rows, target, valid)):
        assert torch.equal(before, after)


def test_empty_batch_and_empty_column_list():
    """B = 0, and a shard with no negatives and no owned target (no columns at all), give empty/-inf stats."""
    weight = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    feats = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    lse, tgt, hardest = triton_local_shard_stats(feats, weight, None, none, none.bool(), SCALE, True)
    assert lse.shape == tgt.shape == hardest.shape == (0,)
    (lse.sum() + tgt.sum()).backward()
    assert feats.grad.shape == (0, 16) and torch.count_nonzero(weight.grad) == 0
    weight.grad = None
    feats = torch.nn.functional.normalize(torch.randn(5, 16, device=DEVICE), dim=1).requires_grad_(True)
    target = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    lse, tgt, hardest = triton_local_shard_stats(feats, weight, none, target, torch.ones(5, dtype=torch.bool,
                                                 device=DEVICE), SCALE, True)
    assert torch.isneginf(lse).all() and torch.count_nonzero(tgt) == 0
    (torch.where(torch.isfinite(lse), lse, 0.0).sum() + tgt.sum()).backward()
    assert torch.count_nonzero(feats.grad) == 0 and weight.grad.is_sparse and weight.grad._nnz() == 0
