"""The losses ``head.loss`` names, registered in ``dsoft_dist.registry.LOSSES``: what the head needs of each.

    from dsoft_dist.registry import LOSSES
    form = LOSSES.get("arcface")      # LossForm: margins {'m1': 1.0, 'm2': 0.5, 'm3': 0.0}, normalize, ...
    LOSSES.get("d_softmax_paper").presets  # {'end_point': 0.9, 'inter_weight_end': None}: the paper's form
    resolve_margins("arcface", m2=0.4)  # (1.0, 0.4, 0.0): the preset with the given values replacing it

A ``LossForm`` carries its margin preset, whether it normalizes (cosine logits with scale s; a loss
that does not has linear logits and scale 1), whether the config may give it m1/m2/m3, the presets of
D-Softmax's end point and inter-weight schedule (``presets``: a loss that reads head.end_point or
head.inter_weight gives them; one without refuses those keys), and
``per_row(z, log_sum_with, head) -> (per_row (B,), terms {name: (B,)})``: the loss of each row of
the global batch from the statistics every class shard contributed (``dsoft_dist.head.combine``):

    z                  (B,) the target cosine z_y (linear logit without normalization)
    log_sum_with(t)    (B,) log(exp(t) + sum_{k in N} exp(s z_k)) for a finite first column t (B,):
                       one SUM over the shards per call, so every rank must make the same calls
    head               the head's settings: scale, end_point, inter_weight, m1, m2, m3, normalize

The terms are logged (their row means) as the run's diagnostics; D-Softmax's are intra and inter.
A loss of your own registers from its module, named in the config's ``extra_modules``:

    LOSSES.register("half_inter", LossForm(lambda z, lsw, head: ...))   # then head.loss=half_inter

The plain-PyTorch references of the same losses are in ``dsoft_dist.losses.functional``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dsoft_dist.losses import functional as LF
from dsoft_dist.registry import LOSSES

NO_MARGINS = {"m1": 1.0, "m2": 0.0, "m3": 0.0}  # cos(1 theta + 0) - 0: the target logit untouched
D_SOFTMAX_KEYS = ("end_point", "inter_weight", "inter_weight_end")  # the head keys only D-Softmax's losses read
D_SOFTMAX_LOSSES = ("d_softmax_paper", "d_softmax")  # the built-in D-Softmax: one loss at two presets


@dataclass(frozen=True, eq=False)
class LossForm:
    """One loss of the head (see the module doc): per_row, the margin preset, normalize, takes_margins."""

    per_row: Callable[..., tuple[torch.Tensor, dict]]
    margins: dict = field(default_factory=lambda: dict(NO_MARGINS))  # the preset m1, m2, m3
    normalize: bool = True  # cosine logits times head.scale; False: linear logits, scale 1
    takes_margins: bool = True  # the config may give head.m1/m2/m3 (else they are refused)
    # D-Softmax's presets of head.end_point and head.inter_weight_end (None there: a constant inter weight), which
    # a given value replaces; empty for a loss without the two terms, which refuses those keys
    presets: dict = field(default_factory=dict)


def d_softmax_rows(z, log_sum_with, head):
    """D-Softmax: intra softplus(s (d - z_y)) + inter_weight * inter log(1 + sum_{k in N} exp(s z_k))."""
    intra = LF.intra_from_parts(z, head.scale, head.end_point)  # (B,)
    inter = log_sum_with(torch.zeros_like(z))  # softplus(LSE)
    return intra + head.inter_weight * inter, {"intra": intra, "inter": inter}


def margin_rows(z, log_sum_with, head):
    """Margin softmax: log(exp(t_y) + sum_{k in N} exp(s z_k)) - t_y with t_y = s (cos(m1 theta_y + m2) - m3),
    or t_y = z_y for linear logits (``head.normalize`` false: plain softmax)."""
    target_logit = head.scale * LF.margin_target(z, head.m1, head.m2, head.m3) if head.normalize else z
    per_row = log_sum_with(target_logit) - target_logit  # (B,)
    return per_row, {"loss": per_row}


def _margins(**given) -> dict:
    return {**NO_MARGINS, **given}


# D-Softmax: d = 1 and the inter weight w -> 0 along a half cosine (docs/losses.md, "Choosing d, s and the inter
# weight"); the paper's form, d = 0.9 with a constant w, by name
LOSSES.register("d_softmax", LossForm(d_softmax_rows, takes_margins=False,
                                      presets={"end_point": 1.0, "inter_weight_end": 0.0}))
LOSSES.register("d_softmax_paper", LossForm(d_softmax_rows, takes_margins=False,
                                            presets={"end_point": 0.9, "inter_weight_end": None}))
LOSSES.register("arcface", LossForm(margin_rows, _margins(m2=0.5)))
LOSSES.register("cosface", LossForm(margin_rows, _margins(m3=0.35)))
LOSSES.register("sphereface", LossForm(margin_rows, _margins(m1=1.35)))  # multiplicative angular margin
LOSSES.register("normface", LossForm(margin_rows, takes_margins=False))
LOSSES.register("softmax", LossForm(margin_rows, normalize=False, takes_margins=False))  # unnormalized, linear
LOSSES.register("margin", LossForm(margin_rows))  # m1, m2, m3 as given


def resolve_margins(loss: str, m1=None, m2=None, m3=None) -> tuple[float, float, float]:
    """(m1, m2, m3) of ``loss``: its registered preset (none for losses without one), each replaced when given."""
    preset = LOSSES.get(loss).margins
    given = dict(m1=m1, m2=m2, m3=m3)
    return tuple(float(preset[k] if given[k] is None else given[k]) for k in ("m1", "m2", "m3"))


def margin_losses() -> tuple[str, ...]:
    """The registered losses of the margin-softmax form (``MarginSoftmaxLoss.preset`` builds them)."""
    return tuple(name for name in LOSSES.names() if LOSSES.get(name).per_row is margin_rows)
