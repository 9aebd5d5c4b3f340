"""The chunked local statistics at the edges of their shift: extreme cosines, masked first chunks, large scales.

    python -m pytest tests/test_head_local.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsoft_dist.head import torch_local_shard_stats
from dsoft_dist.head.cpu_c import cpu_c_local_shard_stats, fixed_shift_ok

# the torch backend (online max shift, natural units) and cpu-c (base 2, the fixed shift, compiled passes)
BACKENDS = pytest.mark.parametrize("stats", [torch_local_shard_stats, cpu_c_local_shard_stats], ids=["torch", "cpu-c"])

D = 8


def _extreme_rows(n_far=400):
    """Features (3, D) and rows (4 + n_far, D): row 0's first chunk (4 rows) at cosine -1, the rest near +1.

    With s = 64 a term near the top is 2^(2 * 64 log2 e - 64) ~ 2^120 against the first chunk's
    shift, so a few hundred of them overflow fp32 unless the shift accounts for their number.
    """
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(3, D, generator=gen), dim=1)
    near = feats[0] + 1e-3 * torch.randn(n_far, D, generator=gen)
    weight = torch.cat([-feats[0].expand(4, D) * torch.tensor([[1.0], [2.0], [0.5], [3.0]]), near])
    return feats, weight


def _reference(feats, weight, target_local, scale):
    """float64 log-sum-exp and max of the cosine logits over the non-target rows, per feature row
    (the features are unit rows already, as the head hands them over)."""
    cos = feats.double() @ F.normalize(weight.double(), dim=1).t()  # (B, n)
    logits = scale * cos
    owned = target_local >= 0
    logits[owned, target_local[owned]] = float("-inf")
    return torch.logsumexp(logits, dim=1), logits.amax(dim=1)


@BACKENDS
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("scale", [30.0, 64.0, 100.0])
def test_lse_and_max_match_float64_at_extreme_cosines(stats, scale, chunk):
    """Rows whose first chunk holds their worst cosines (or only their target) still get the exact lse."""
    feats, weight = _extreme_rows()
    target = torch.tensor([-1, 7, 0])  # row 2's target is row 0: with chunk 1 its first chunk has no negative
    valid = torch.ones(3, dtype=torch.bool)
    lse, tgt, mx = stats(feats, weight, None, target, valid, scale, True, chunk_size=chunk)
    want_lse, want_max = _reference(feats, weight, target, scale)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(mx.double(), want_max, rtol=1e-6, atol=1e-4)


def test_the_fixed_shift_is_used_only_where_its_bound_holds():
    assert fixed_shift_ok(64.0, 1_000_000, True)  # 92.3 + 19.9 <= 114
    assert not fixed_shift_ok(64.0, 4_000_000, True)  # 92.3 + 21.9 > 114: one max per chunk instead
    assert not fixed_shift_ok(100.0, 400, True)
    assert not fixed_shift_ok(1.0, 400, False)  # raw (softmax) logits are unbounded


@BACKENDS
@pytest.mark.parametrize("scale", [64.0, 100.0])
def test_gradients_match_float64_autograd_at_extreme_cosines(stats, scale):
    """Backward (which shifts by the exact lse) agrees with autograd through a float64 logsumexp."""
    feats, weight = _extreme_rows(n_far=40)
    target = torch.tensor([-1, 7, 0])
    valid = torch.ones(3, dtype=torch.bool)
    f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lse, tgt, _ = stats(f, w, None, target, valid, scale, True, chunk_size=4)
    (lse.sum() / 100 + tgt.sum()).backward()
    f64, w64 = feats.double().requires_grad_(True), weight.double().requires_grad_(True)
    want_lse, _ = _reference(f64, w64, target, scale)
    w_hat = F.normalize(w64, dim=1)
    want_tgt = torch.stack([(f64[i] * w_hat[t]).sum() if t >= 0 else f64.new_zeros(()) for i, t in enumerate(target)])
    (want_lse.sum() / 100 + want_tgt.sum()).backward()
    for got, want in ((f.grad, f64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@BACKENDS
@pytest.mark.parametrize("chunk", [4, 64])
def test_rows_far_below_the_bound_do_not_underflow(stats, chunk):
    """All cosines near -1 at s = 64: exp(l - bound) ~ 2^-184 would round to 0; the first chunk's max sets the shift."""
    gen = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(2, D, generator=gen), dim=1)
    weight = -(feats[0] + 1e-2 * torch.randn(40, D, generator=gen))
    target, valid = torch.tensor([-1, -1]), torch.ones(2, dtype=torch.bool)
    lse, _, mx = stats(feats, weight, None, target, valid, 64.0, True, chunk_size=chunk)
    want_lse, want_max = _reference(feats, weight, target, 64.0)
    assert want_lse[0] < -60
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(mx.double(), want_max, rtol=1e-6, atol=1e-4)
