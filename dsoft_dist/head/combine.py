"""Turns every class shard's per-row statistics into the loss (identical on all ranks), with reductions.

Input on rank p: (lse_p, target_p, max_p), each (B,), from ``dsoft_dist.head.local``, and
the rows' ``owned`` mask (this shard owns the row's class). Per row i (DESIGN.md §1-§2), with the
loss registered under ``head.loss`` forming the row's loss (``dsoft_dist.losses.forms``), e.g.:

    z_y        = target_p of the one shard p that owns y_i
    d_softmax  = softplus(s (d - z_y)) + lambda * log(1 + c * sum_p exp(lse_p))
    margin     = log(exp(t_y) + sum_p exp(lse_p)) - t_y,      t_y = s psi(z_y)  (linear: z_y)

c is the optional inter correction |all negatives| / |N| (passed as log c). Two all-reduces
over the process group carry everything, 16 B bytes per rank whatever the number of ranks P:

    MAX over (3, B) fp32: max_p lse_p, z_y (non-owners send -inf), max_p max_p (diagnostics)
    SUM over (B,)  fp32:  S = sum_p exp(lse_p + log c - m),  m = max(max_p lse_p + log c, first)

with first = 0 (d_softmax) or t_y (margins). Then log(exp(first) + c sum_p exp(lse_p)) =
m + log(exp(first - m) + S): every term is <= 1 and the first column is finite, so shards
without negatives (lse_p = -inf) give exact zeros, never NaN. m is a constant of the
backward (the result does not depend on it); the SUM's backward is the identity, since every
rank forms the same loss from S (``dsoft_dist.parallel.reduce_replicated``). The loss is the
mean over non-ignored rows of the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dsoft_dist.parallel import all_reduce, reduce_replicated


def combine_stats(lse, target, hardest, *, owned, valid, head, log_correction=None, group=None, counter=None):
    """Returns (loss scalar, terms {name: (B,)}, hardest (B,)) from this shard's stats, each (B,).

    ``head`` supplies the loss (``loss_form``, a ``dsoft_dist.losses.forms.LossForm``), scale, end_point,
    inter_weight, normalize and the margins m1, m2, m3.
    ``log_correction`` is None or a 0-d tensor log(c) added to every shard's lse. ``hardest``
    is the largest negative logit over all shards (no gradient).
    """
    neg_inf = torch.full_like(lse, float("-inf"))
    packed = torch.stack([lse, torch.where(owned, target, neg_inf), hardest]).detach()  # (3, B)
    top = all_reduce(packed, op=dist.ReduceOp.MAX, group=group, counter=counter, name="stats_max")
    lse_max, z_owner, hardest_all = top[0], top[1], top[2]
    # the owner keeps its own target (and its gradient); the others take the reduced value
    z = torch.where(owned, target, torch.where(valid, z_owner, torch.zeros_like(z_owner)))  # (B,)
    if log_correction is not None:
        lse, lse_max = lse + log_correction, lse_max + log_correction

    def log_sum_with(first):  # (B,) log(exp(first) + sum_p exp(lse_p)): one SUM over the shards
        return _log_sum_with(first, lse, lse_max, group, counter)

    per_row, terms = head.loss_form.per_row(z, log_sum_with, head)  # the registered loss (losses.forms)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    loss = per_row.sum() / valid.sum().clamp(min=1).to(per_row.dtype)
    return loss, {**terms, "target_cos": z}, hardest_all


def _log_sum_with(first, lse, lse_max, group, counter):
    """log(exp(first) + sum_p exp(lse_p)) per row (B,), from this shard's lse (B,) and max_p lse_p (B,)."""
    shift = torch.maximum(lse_max, first).detach()  # finite: first is
    total = reduce_replicated(torch.exp(lse - shift), group, counter, "stats_sum")  # (B,) each term <= 1
    return shift + torch.log(torch.exp(first - shift) + total)


def diagnostics_from(terms: dict, hardest: torch.Tensor, valid: torch.Tensor, scale: float) -> dict:
    """Row means over non-ignored rows (0-d float tensors, no host sync): the terms, target_cos, hardest_neg_cos.

    ``hardest`` (B,) is the largest negative logit over all shards (-inf: none).
    """
    with torch.no_grad():
        hardest = hardest / scale  # (B,) the hardest negative's cosine (linear: logit)
        hardest = torch.where(torch.isfinite(hardest), hardest, torch.zeros_like(hardest))
        n = valid.sum().clamp(min=1)
        rows = {**terms, "hardest_neg_cos": hardest}
        return {k: (torch.where(valid, v.detach(), torch.zeros_like(v)).sum() / n).float() for k, v in rows.items()}
