"""The loss family on a cosine (or logit) matrix: D-Softmax, margin softmax, softmax.

Plain PyTorch, device-agnostic, batch-first; inputs of any float dtype are computed in
float32 (float64 stays float64 so gradcheck works). Math: shared/DESIGN.md §1.

    cos = F.normalize(emb) @ F.normalize(W).T                 # (B, C)
    loss = d_softmax(cos, labels, scale=64.0, end_point=0.9)
    intra, inter = d_softmax_terms(cos, labels, scale=64.0, end_point=0.9)

Labels are int64 in [0, C); -1 marks an ignored row (no loss, no gradient). "mean"
averages over the rows that are not ignored.

Every loss is built from two per-row parts, which is also how the sharded head and
the kernels compute it: the target cosine z_y (B,) and the negatives' cosines with a
mask saying which entries are negatives of which row. The ``*_from_parts`` forms take
those parts directly, so callers that only computed a subset of columns (sampled
negatives) use exactly the same math.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def label_dtype_problem(where: str, dtype=None) -> str:
    """The one wording of labels that are not int64 class ids (``where``: which labels)."""
    return f"{where} must be int64 class ids{f', got {dtype}' if dtype is not None else ''}; use labels.long()"


def label_range_problem(low: int, high: int, num_classes: int, where: str = "labels",
                        fix: str | None = None) -> str | None:
    """The one wording of labels outside [-1, num_classes) (-1 = an ignored row) from their min and max,
    or None when they are inside: the loss modules, the head's cross-rank checks and the trainer use it."""
    if low >= -1 and high < num_classes:
        return None
    bad = low if low < -1 else high
    fix = fix or f"check num_classes={num_classes} against the dataset"
    return f"{where} contain {bad}, outside [0, {num_classes}) (use -1 to ignore a row); {fix}"


def validate_labels(labels: torch.Tensor, num_classes: int, where: str = "labels", fix: str | None = None) -> None:
    """Raises ValueError unless labels are 1-D int64 in [-1, num_classes) (-1 = ignored row); ``fix`` replaces
    the message's advice for a label out of range.

    Reads the labels' min/max on the host: call it at the API boundary, not in a hot loop.
    """
    if labels.dtype != torch.int64:
        raise ValueError(label_dtype_problem(where, labels.dtype))
    if labels.dim() != 1:
        raise ValueError(f"{where} must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        return
    problem = label_range_problem(int(labels.min()), int(labels.max()), num_classes, where, fix)
    if problem:
        raise ValueError(problem)


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid; use one of {_REDUCTIONS}")
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum().clamp(min=1).to(per_row.dtype)


def masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise log(exp(extra) + sum_{mask} exp(logits)); -inf-safe for empty rows.

    logits (B, K), mask (B, K) bool, extra (B,) or None (None = no extra term).
    An empty row gives ``extra`` (or -inf when extra is None) with zero gradient.
    """
    masked = logits.masked_fill(~mask, float("-inf"))  # (B, K)
    if masked.shape[1] > 0:
        m = masked.amax(dim=1)  # (B,)
    else:
        m = logits.new_full((logits.shape[0],), float("-inf"))
    if extra is not None:
        m = torch.maximum(m, extra)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # (B,)
    total = torch.exp(masked - m[:, None]).sum(dim=1)  # (B,)
    if extra is not None:
        total = total + torch.exp(extra - m)
    return m + torch.log(total)


def inter_from_parts(neg_logits: torch.Tensor, neg_mask: torch.Tensor, inter_correction: float = 1.0) -> torch.Tensor:
    """D-Softmax inter term per row: softplus(log(corr) + LSE_{negatives}(s z_k)).

    neg_logits (B, K) = scale * cosines of candidate negatives; neg_mask (B, K) bool
    True where the entry is a negative of that row (targets must be False).
    """
    lse = masked_logsumexp(neg_logits, neg_mask)  # (B,), -inf when no negatives
    if inter_correction != 1.0:
        lse = lse + math.log(inter_correction)
    return torch.logaddexp(torch.zeros_like(lse), lse)  # softplus, exact at -inf


def intra_from_parts(target_cos: torch.Tensor, scale: float, end_point: float) -> torch.Tensor:
    """D-Softmax intra term per row: softplus(s (d - z_y)). target_cos (B,)."""
    return F.softplus(scale * (end_point - target_cos))


def d_softmax_from_parts(target_cos, neg_cos, neg_mask, scale, end_point, inter_weight=1.0,
                         inter_correction=1.0, valid=None, reduction="mean"):
    """D-Softmax from per-row parts: L = L_intra + inter_weight * L_inter.

    target_cos (B,), neg_cos (B, K), neg_mask (B, K) bool, valid (B,) bool or None.
    """
    intra = intra_from_parts(target_cos, scale, end_point)
    inter = inter_from_parts(scale * neg_cos, neg_mask, inter_correction)
    valid = torch.ones_like(intra, dtype=torch.bool) if valid is None else valid
    return _reduce(intra + inter_weight * inter, valid, reduction)


def _full_parts(cosine: torch.Tensor, labels: torch.Tensor, negatives_mask: torch.Tensor | None):
    """Splits a (B, C) cosine matrix into (z_y, cosine, negatives mask without targets, valid)."""
    x = cosine.to(_compute_dtype(cosine))
    valid = labels >= 0  # (B,)
    safe = labels.clamp(min=0)
    target = x.gather(1, safe[:, None]).squeeze(1)  # (B,)
    is_target = F.one_hot(safe, x.shape[1]).bool()  # (B, C)
    mask = ~is_target if negatives_mask is None else negatives_mask.bool() & ~is_target
    mask = mask & valid[:, None]
    return target, x, mask, valid


def d_softmax_terms(cosine, labels, scale, end_point, negatives_mask=None, inter_correction=1.0):
    """Per-row (intra, inter) D-Softmax terms, each (B,); ignored rows give 0.

    cosine (B, C); labels (B,) int64; negatives_mask (B, C) bool restricts the inter
    sum to a negative set (the target is always excluded); inter_correction multiplies
    the inter sum (e.g. 1/r for the unbiased sampled estimate).
    """
    target, x, mask, valid = _full_parts(cosine, labels, negatives_mask)
    zero = torch.zeros_like(target)
    intra = torch.where(valid, intra_from_parts(target, scale, end_point), zero)
    inter = torch.where(valid, inter_from_parts(scale * x, mask, inter_correction), zero)
    return intra, inter


def d_softmax(cosine, labels, scale, end_point, inter_weight=1.0, negatives_mask=None,
              inter_correction=1.0, reduction="mean"):
    """D-Softmax loss: softplus(s (d - z_y)) + inter_weight * softplus(LSE_{k in N}(s z_k))."""
    intra, inter = d_softmax_terms(cosine, labels, scale, end_point, negatives_mask, inter_correction)
    return _reduce(intra + inter_weight * inter, labels >= 0, reduction)


def margin_target(target_cos: torch.Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> torch.Tensor:
    """Target cosine with the combined margin: cos(m1 theta + m2) - m3 (theta = acos z_y).

    m1 == 1 (ArcFace/CosFace/NormFace): closed form cos(theta + m2) = z cos m2 - sin(theta) sin m2;
    where theta + m2 > pi it falls back to z - m2 sin(m2) (the usual ArcFace rule that
    keeps the target logit decreasing in theta).
    m1 > 1 (SphereFace): the monotone extension psi = (-1)^k cos(phi) - 2k with
    phi = m1 theta + m2 and k = floor(phi / pi).
    """
    z = target_cos
    if m1 == 1.0 and m2 == 0.0:
        return z - m3
    if m1 == 1.0:
        sin_theta = torch.sqrt((1.0 - z * z).clamp(min=1e-12))
        arc = z * math.cos(m2) - sin_theta * math.sin(m2)
        fallback = z - m2 * math.sin(m2)
        return torch.where(z > math.cos(math.pi - m2), arc, fallback) - m3
    eps = 1e-7 if z.dtype != torch.float64 else 1e-12
    phi = m1 * torch.acos(z.clamp(-1.0 + eps, 1.0 - eps)) + m2
    k = torch.floor(phi / math.pi).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(phi) - 2.0 * k - m3


def margin_softmax_from_parts(target_logit, neg_logits, neg_mask, valid=None, reduction="mean"):
    """Softmax cross-entropy from parts: LSE({t_y} U {l_k: k in N}) - t_y.

    target_logit (B,) (already scaled, margin applied), neg_logits (B, K), neg_mask (B, K).
    """
    per_row = masked_logsumexp(neg_logits, neg_mask, extra=target_logit) - target_logit
    valid = torch.ones_like(per_row, dtype=torch.bool) if valid is None else valid
    return _reduce(per_row, valid, reduction)


def margin_softmax(cosine, labels, scale, m1=1.0, m2=0.0, m3=0.0, negatives_mask=None, reduction="mean"):
    """Combined-margin softmax on cosines: NormFace (no margin), SphereFace (m1), ArcFace (m2), CosFace (m3).

    L = -log( e^{s psi(z_y)} / (e^{s psi(z_y)} + sum_{k in N, k != y} e^{s z_k}) ).
    """
    target, x, mask, valid = _full_parts(cosine, labels, negatives_mask)
    target_logit = scale * margin_target(target, m1, m2, m3)
    return margin_softmax_from_parts(target_logit, scale * x, mask, valid, reduction)


def softmax(logits, labels, negatives_mask=None, reduction="mean"):
    """Plain softmax cross-entropy on unnormalized logits (B, C) (the linear baseline)."""
    target, x, mask, valid = _full_parts(logits, labels, negatives_mask)
    return margin_softmax_from_parts(target, x, mask, valid, reduction)
