"""The loss family against direct float64 transcriptions of DESIGN.md §1 (loss and gradients).

The transcriptions below loop over rows and classes in Python on float64 with
``math`` functions, deliberately sharing no code with dsoft_dist.losses.
"""
import math

import pytest
import torch

from dsoft_dist.losses import d_softmax, d_softmax_terms, margin_softmax, margin_target, softmax

# ---- float64 transcriptions -------------------------------------------------------------

def ref_d_softmax_rows(cos, labels, s, d, lam=1.0, mask=None, corr=1.0):
    """Per-row (intra, inter, total) as torch float64 scalars built with autograd-friendly ops."""
    rows = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        if y < 0:
            continue
        intra = torch.log(1 + math.exp(s * d) / torch.exp(s * cos[i, y]))
        terms = [torch.exp(s * cos[i, k]) for k in range(cos.shape[1]) if k != y and (mask is None or mask[i, k])]
        total = sum(terms) if terms else torch.zeros((), dtype=cos.dtype)
        inter = torch.log(1 + corr * total)
        rows.append((intra, inter, intra + lam * inter))
    return rows


def ref_d_softmax(cos, labels, s, d, lam=1.0, mask=None, corr=1.0):
    rows = ref_d_softmax_rows(cos, labels, s, d, lam, mask, corr)
    return sum(r[2] for r in rows) / max(len(rows), 1)


def ref_psi(z, m1, m2, m3):
    """cos(m1 theta + m2) - m3 with the documented extensions past pi, on a python float."""
    theta = math.acos(max(-1.0, min(1.0, z)))
    if m1 == 1.0:
        if theta + m2 <= math.pi:
            return math.cos(theta + m2) - m3
        return z - m2 * math.sin(m2) - m3
    phi = m1 * theta + m2
    k = math.floor(phi / math.pi)
    return (-1) ** k * math.cos(phi) - 2 * k - m3


def ref_psi_tensor(z, m1, m2, m3):
    """ref_psi with torch ops on a 0-d float64 tensor (the branch is chosen on its value)."""
    theta = torch.acos(z)
    if m1 == 1.0 and float(theta.detach()) + m2 > math.pi:
        return z - m2 * math.sin(m2) - m3
    phi = m1 * theta + m2
    k = math.floor(float(phi.detach()) / math.pi)
    return (-1) ** k * torch.cos(phi) - 2 * k - m3


def ref_margin_softmax(cos, labels, s, m1, m2, m3, mask=None):
    """-log(e^{s psi} / (e^{s psi} + sum_{k != y} e^{s z_k})), mean over non-ignored rows."""
    losses = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        if y < 0:
            continue
        t = s * ref_psi_tensor(cos[i, y], m1, m2, m3)
        negs = [s * cos[i, k] for k in range(cos.shape[1]) if k != y and (mask is None or mask[i, k])]
        losses.append(-t + torch.logsumexp(torch.stack([t] + negs), 0))
    return sum(losses) / max(len(losses), 1)


def rand_cos(b, c, seed, near_one=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, generator=g, dtype=torch.float64) * 2 - 1
    if near_one:
        x = torch.sign(x) * (1 - torch.rand(b, c, generator=g, dtype=torch.float64) * 1e-3)
    return x.to(dtype)


CASES = [  # (B, C, scale, near_one)
    (5, 1, 64.0, False),
    (6, 7, 32.0, False),
    (8, 13, 64.0, True),
    (4, 9, 128.0, True),
]


def _value_and_grad(loss_fn, cos, *args, **kwargs):
    """loss_fn(cos, *args, **kwargs) and its gradient w.r.t. a fresh leaf copy of cos."""
    leaf = cos.detach().clone().requires_grad_()
    loss = loss_fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, grad


def _labels(b, c, seed):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, c, (b,), generator=g)
    y[0], y[-1] = 0, c - 1  # labels at both ends
    return y


# ---- D-Softmax ---------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,s,near", CASES)
@pytest.mark.parametrize("d", [0.9, 0.3])
def test_d_softmax_matches_transcription_loss_and_grad(b, c, s, near, d):
    cos = rand_cos(b, c, seed=b * c, near_one=near)
    y = _labels(b, c, b)
    ours, g_ours = _value_and_grad(d_softmax, cos, y, s, d, inter_weight=0.7)
    ref, g_ref = _value_and_grad(ref_d_softmax, cos, y, s, d, lam=0.7)
    # the transcription overflows exp at s=128 near +1 (e^128 is fine in float64; e^(128*1)/e^(...) ok)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_d_softmax_terms_match_transcription_with_mask_and_correction():
    cos = rand_cos(6, 11, seed=3)
    y = _labels(6, 11, 3)
    mask = torch.rand(6, 11, generator=torch.Generator().manual_seed(5)) > 0.5
    intra, inter = d_softmax_terms(cos, y, 32.0, 0.8, negatives_mask=mask, inter_correction=4.0)
    rows = ref_d_softmax_rows(cos, y, 32.0, 0.8, mask=mask, corr=4.0)
    torch.testing.assert_close(intra, torch.stack([r[0] for r in rows]))
    torch.testing.assert_close(inter, torch.stack([r[1] for r in rows]))


def test_closed_form_gradients_of_design_doc():
    """dL_inter/d(s z_k) = sigmoid(LSE) exp(s z_k - LSE); dL_intra/d(s z_y) = -sigmoid(s (d - z_y))."""
    s, d = 16.0, 0.9
    cos = rand_cos(4, 6, seed=11).requires_grad_()
    y = _labels(4, 6, 11)
    intra, inter = d_softmax_terms(cos, y, s, d)
    (g_inter,) = torch.autograd.grad(inter.sum(), cos, retain_graph=True)
    (g_intra,) = torch.autograd.grad(intra.sum(), cos)
    for i in range(4):
        yi = int(y[i])
        negs = torch.tensor([s * float(cos[i, k].detach()) for k in range(6) if k != yi], dtype=torch.float64)
        lse = torch.logsumexp(negs, 0)
        for k in range(6):
            want = 0.0 if k == yi else float(torch.sigmoid(lse) * torch.exp(s * cos[i, k].detach() - lse)) * s
            assert g_inter[i, k].item() == pytest.approx(want, rel=1e-9, abs=1e-15)
        want_y = -float(torch.sigmoid(s * (d - cos[i, yi].detach()))) * s
        assert g_intra[i, yi].item() == pytest.approx(want_y, rel=1e-9)


def test_ignored_rows_give_no_loss_and_no_gradient():
    cos = rand_cos(5, 8, seed=2).requires_grad_()
    y = _labels(5, 8, 2)
    y[2] = -1
    loss = d_softmax(cos, y, 32.0, 0.9)
    (g,) = torch.autograd.grad(loss, cos)
    assert torch.all(g[2] == 0)
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(loss, d_softmax(cos.detach()[keep], y[keep], 32.0, 0.9))


def test_all_rows_ignored_gives_zero_and_finite_grad():
    cos = rand_cos(3, 4, seed=2).requires_grad_()
    y = torch.full((3,), -1)
    loss = d_softmax(cos, y, 32.0, 0.9) + margin_softmax(cos, y, 32.0, m2=0.5)
    (g,) = torch.autograd.grad(loss, cos)
    assert loss.item() == 0.0 and torch.all(g == 0)


# ---- margin family -----------------------------------------------------------------------

MARGINS = [  # (m1, m2, m3) NormFace, ArcFace, CosFace, SphereFace, combined
    (1.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.35, 0.0, 0.0), (1.0, 0.3, 0.2), (2.0, 0.1, 0.1),
]


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_margin_target_matches_math(m1, m2, m3):
    z = torch.linspace(-0.999, 0.999, 41, dtype=torch.float64)
    got = margin_target(z, m1, m2, m3)
    want = torch.tensor([ref_psi(float(v), m1, m2, m3) for v in z], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_margin_target_is_monotone_decreasing_in_theta(m1, m2, m3):
    theta = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    psi = margin_target(torch.cos(theta), m1, m2, m3)
    assert torch.all(psi[1:] <= psi[:-1] + 1e-9)


@pytest.mark.parametrize("b,c,s,near", CASES)
@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_margin_softmax_matches_transcription(b, c, s, near, m1, m2, m3):
    cos = rand_cos(b, c, seed=7 * b + c, near_one=near)
    y = _labels(b, c, c)
    ours, g_ours = _value_and_grad(margin_softmax, cos, y, s, m1, m2, m3)
    ref, g_ref = _value_and_grad(ref_margin_softmax, cos, y, s, m1, m2, m3)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-9)


def test_normface_equals_cross_entropy_and_softmax_is_plain_ce():
    cos = rand_cos(6, 10, seed=9)
    y = _labels(6, 10, 9)
    ce = torch.nn.functional.cross_entropy(32.0 * cos, y)
    torch.testing.assert_close(margin_softmax(cos, y, 32.0), ce)
    logits = torch.randn(6, 10, dtype=torch.float64) * 20
    torch.testing.assert_close(softmax(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_arcface_matches_cos_theta_plus_m_inside_range():
    z = torch.tensor([0.9, 0.2, -0.5], dtype=torch.float64)
    torch.testing.assert_close(margin_target(z, m2=0.5), torch.cos(torch.acos(z) + 0.5))


# ---- gradcheck, stability, dtypes --------------------------------------------------------

def test_gradcheck_float64_all_losses():
    cos = (rand_cos(4, 6, seed=21) * 0.95).requires_grad_()
    y = _labels(4, 6, 21)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    assert torch.autograd.gradcheck(lambda x: d_softmax(x, y, 8.0, 0.9, 0.5, mask, 2.0), (cos,))
    for m in MARGINS:
        assert torch.autograd.gradcheck(lambda x: margin_softmax(x, y, 8.0, *m, negatives_mask=mask), (cos,))
    assert torch.autograd.gradcheck(lambda x: softmax(x * 5, y), (cos,))


@pytest.mark.parametrize("c", [1, 1000, 200_000])
def test_stable_at_scale_128_near_plus_minus_one(c):
    cos = torch.ones(4, c)
    cos[1] = -1.0
    cos[2, :] = 0.999
    y = torch.tensor([0, c - 1, 0, c // 2])
    cos.requires_grad_()
    for loss in (d_softmax(cos, y, 128.0, 0.9), margin_softmax(cos, y, 128.0, m2=0.5),
                 margin_softmax(cos, y, 128.0, m1=1.35)):
        (g,) = torch.autograd.grad(loss, cos)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("loss_fn", [
    lambda x, y: d_softmax(x, y, 64.0, 0.9),
    lambda x, y: margin_softmax(x, y, 64.0, m2=0.5),
    lambda x, y: margin_softmax(x, y, 64.0, m3=0.35),
])
def test_bf16_inputs_computed_in_fp32(loss_fn):
    cos64 = rand_cos(8, 50, seed=4)
    y = _labels(8, 50, 4)
    x16 = cos64.to(torch.bfloat16).requires_grad_()
    out = loss_fn(x16, y)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out, x16)
    assert g.dtype == torch.bfloat16
    want = loss_fn(x16.detach().double(), y)  # same rounded inputs, exact math
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_reduction_is_a_clear_error():
    with pytest.raises(ValueError, match="reduction='avg'"):
        d_softmax(rand_cos(2, 3, 0), torch.tensor([0, 1]), 1.0, 0.9, reduction="avg")
