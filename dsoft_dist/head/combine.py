"""Turns the per-rank row statistics of every class shard into the loss (identical on all ranks).

Input: ``stats`` (P, 3, B) = for each shard p the rows' (lse_p, target part, max logit) from
``dsoft_dist.head.local``. Per row i (DESIGN.md §1-§2):

    z_y        = sum_p target_p                              (only the owner shard is non-zero)
    d_softmax  = softplus(s (d - z_y)) + lambda * log(1 + c * sum_p exp(lse_p))
    margin     = log(exp(t_y) + sum_p exp(lse_p)) - t_y,      t_y = s psi(z_y)  (linear: z_y)

c is the optional inter correction |all negatives| / |N| (passed as log c). Every
logsumexp here has a finite column (0 or t_y), so shards without negatives (lse_p = -inf)
give exact zeros, never NaN. The loss is the mean over non-ignored rows of the global batch.
"""
from __future__ import annotations

import torch

from dsoft_dist.losses import functional as LF


def _lse_with(first: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """log(exp(first) + sum_p exp(lse_all[p])) per row; first (B,), lse_all (P, B)."""
    return torch.logsumexp(torch.cat([first[None], lse_all], dim=0), dim=0)


def combine_stats(stats: torch.Tensor, valid: torch.Tensor, head, log_correction=None):
    """Returns (loss scalar, terms {name: (B,)}) from the gathered stats (P, 3, B).

    ``head`` supplies loss, scale, end_point, inter_weight and the margins m1, m2, m3.
    ``log_correction`` is None or a 0-d tensor log(c) added to every shard's lse.
    """
    lse_all, target = stats[:, 0], stats[:, 1].sum(dim=0)  # (P, B), (B,)
    if log_correction is not None:
        lse_all = lse_all + log_correction
    if head.loss == "d_softmax":
        intra = LF.intra_from_parts(target, head.scale, head.end_point)  # (B,)
        inter = _lse_with(torch.zeros_like(target), lse_all)  # softplus(LSE), exact when no negatives
        per_row = intra + head.inter_weight * inter
        terms = {"intra": intra, "inter": inter}
    else:
        if head.loss == "softmax":
            target_logit = target
        else:
            target_logit = head.scale * LF.margin_target(target, head.m1, head.m2, head.m3)
        per_row = _lse_with(target_logit, lse_all) - target_logit
        terms = {"loss": per_row}
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    loss = per_row.sum() / valid.sum().clamp(min=1).to(per_row.dtype)
    return loss, {**terms, "target_cos": target}


def diagnostics_from(stats: torch.Tensor, valid: torch.Tensor, terms: dict, scale: float) -> dict:
    """Row means over non-ignored rows (0-d float tensors, no host sync): the terms, target_cos, hardest_neg_cos."""
    with torch.no_grad():
        hardest = stats[:, 2].amax(dim=0) / scale  # (B,) the hardest negative's cosine (linear: logit)
        hardest = torch.where(torch.isfinite(hardest), hardest, torch.zeros_like(hardest))
        n = valid.sum().clamp(min=1)
        rows = {**terms, "hardest_neg_cos": hardest}
        return {k: (torch.where(valid, v.detach(), torch.zeros_like(v)).sum() / n).float() for k, v in rows.items()}
