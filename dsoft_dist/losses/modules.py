"""Single-process loss modules that own their class centers (pytorch-metric-learning style).

    loss_fn = dsoft_dist.DSoftmaxLoss(num_classes=1000, embedding_size=512, negatives="random",
                                      sample_rate=1 / 64)
    loss = loss_fn(embeddings, labels)          # embeddings (B, D), labels (B,) int64
    loss.backward(); loss_fn.diagnostics()      # {'intra': ..., 'inter': ..., 'target_cos': ..., ...}

With sampled negatives only the selected class rows enter the matmul, so the cost is
O(B * K * D) with K = ceil(r * C). For many GPUs use ``dsoft_dist.ShardedClassifier``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsoft_dist.losses import functional as LF
from dsoft_dist.losses.forms import margin_losses
from dsoft_dist.losses.negatives import MODES, select_classes
from dsoft_dist.registry import LOSSES


class _ClassCenters(nn.Module):
    """Owns the (C, D) class-center weight, the negative selection and the diagnostics."""

    def __init__(self, num_classes, embedding_size, negatives="all", sample_rate=1.0, seed=0,
                 normalize=True, checks=True):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes={num_classes} and embedding_size={embedding_size} must both be >= 1")
        if negatives == "nearest":
            raise ValueError("negatives='nearest' reads a table of each class's nearest classes that only the sharded "
                             "head keeps; use dsoft_dist.ShardedClassifier (it runs in one process too)")
        if negatives not in MODES:
            raise ValueError(f"negatives={negatives!r} is invalid; use one of {', '.join(MODES)}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} is invalid: must be in (0, 1], e.g. 1/64")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.negatives, self.sample_rate, self.seed = negatives, sample_rate, seed
        self.normalize, self.checks = normalize, checks  # checks: validate the labels of every forward
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))
        # counts draws (training-mode forwards; seeds the negatives): named "step" in saved state_dicts, kept
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=True)
        self.last_stats: dict[str, torch.Tensor] = {}

    def _parts(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Returns (target (B,), neg (B, K), neg_mask (B, K), valid (B,), num_selected)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows but embeddings has {embeddings.shape[0]}")
        if self.checks:
            LF.validate_labels(labels, self.num_classes)
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        f, w = embeddings.to(dtype), self.weight.to(dtype)
        if self.normalize:
            f, w = F.normalize(f, dim=1), F.normalize(w, dim=1)
        classes = select_classes(self.negatives, labels, self.num_classes, self.sample_rate,
                                 self.seed, int(self.step) if self.negatives in ("random", "partial") else 0)
        if self.training:
            self.step += 1
        valid = labels >= 0  # (B,)
        safe = labels.clamp(min=0)
        target = (f * w[safe]).sum(dim=1)  # (B,)
        if classes is None:
            neg = f @ w.t()  # (B, C)
            cols = torch.arange(self.num_classes, device=labels.device)
        else:
            neg = f @ w[classes].t()  # (B, K)
            cols = classes
        neg_mask = (cols[None, :] != labels[:, None]) & valid[:, None]  # (B, K)
        return target, neg, neg_mask, valid, cols.numel()

    def _record(self, valid, target, neg, neg_mask, **terms):
        with torch.no_grad():
            n = valid.sum().clamp(min=1)
            hardest = neg.masked_fill(~neg_mask, float("-inf")).amax(dim=1) if neg.shape[1] else target * 0
            hardest = torch.where(valid & neg_mask.any(dim=1), hardest, torch.zeros_like(hardest))
            stats = {"target_cos": target, "hardest_neg_cos": hardest, **terms}
            self.last_stats = {k: (torch.where(valid, v.detach(), torch.zeros_like(v)).sum() / n).float()
                               for k, v in stats.items()}

    def diagnostics(self) -> dict[str, float]:
        """The last forward's row means as floats (reads values to the host: call outside the step)."""
        return {k: float(v) for k, v in self.last_stats.items()}


class DSoftmaxLoss(_ClassCenters):
    """D-Softmax: softplus(s (d - z_y)) + inter_weight * softplus(log(c) + LSE_{k in N}(s z_k)).

    Args: num_classes C, embedding_size D, scale s, end_point d (None: head.loss=d_softmax's preset, 1.0; the
    paper's is 0.9), inter_weight (constant here: the trainer's schedule of it is the config's), negatives
    ("all" | "batch" | "random" | "partial"), sample_rate r (for random/partial),
    inter_correction (True scales the inter sum by C / |N|, the unbiased estimate), seed.
    forward(embeddings (B, D), labels (B,) int64, -1 = ignore) -> scalar loss (mean).
    """

    def __init__(self, num_classes, embedding_size, scale=64.0, end_point=None, inter_weight=1.0,
                 negatives="all", sample_rate=1.0, inter_correction=False, seed=0, checks=True):
        super().__init__(num_classes, embedding_size, negatives, sample_rate, seed, True, checks)
        if end_point is None:
            end_point = LOSSES.get("d_softmax").presets["end_point"]
        self.scale, self.end_point, self.inter_weight = scale, end_point, inter_weight
        self.inter_correction = inter_correction

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target, neg, neg_mask, valid, k = self._parts(embeddings, labels)
        corr = self.num_classes / k if self.inter_correction else 1.0
        intra = LF.intra_from_parts(target, self.scale, self.end_point)  # (B,)
        inter = LF.inter_from_parts(self.scale * neg, neg_mask, corr)  # (B,)
        self._record(valid, target, neg, neg_mask, intra=intra, inter=inter)
        return LF._reduce(intra + self.inter_weight * inter, valid, "mean")


class MarginSoftmaxLoss(_ClassCenters):
    """Combined-margin softmax: target logit s (cos(m1 theta + m2) - m3), negatives s z_k.

    ``MarginSoftmaxLoss.preset("arcface", C, D)`` etc. (normface, arcface, cosface,
    sphereface, softmax). loss="softmax" uses unnormalized linear logits (no scale, no margin).
    With negatives="partial" and sample_rate r it is the Partial-FC-style sampled softmax.
    """

    def __init__(self, num_classes, embedding_size, scale=64.0, m1=1.0, m2=0.0, m3=0.0,
                 negatives="all", sample_rate=1.0, seed=0, linear=False, checks=True):
        super().__init__(num_classes, embedding_size, negatives, sample_rate, seed, not linear, checks)
        self.scale = 1.0 if linear else scale
        self.m1, self.m2, self.m3, self.linear = m1, m2, m3, linear

    @classmethod
    def preset(cls, name: str, num_classes: int, embedding_size: int, **kwargs) -> "MarginSoftmaxLoss":
        """Builds a registered loss of the margin form with its margins (``LOSSES``, ``dsoft_dist.losses.forms``):
        normface, arcface, cosface, sphereface, softmax (linear) or margin; keyword arguments replace them."""
        if name not in margin_losses():
            raise ValueError(f"loss preset {name!r} is unknown; use one of {', '.join(margin_losses())}")
        form = LOSSES.get(name)
        return cls(num_classes, embedding_size, **{**form.margins, "linear": not form.normalize, **kwargs})

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target, neg, neg_mask, valid, _ = self._parts(embeddings, labels)
        if self.linear:
            target_logit = target
        else:
            target_logit = self.scale * LF.margin_target(target, self.m1, self.m2, self.m3)
        per_row = LF.margin_softmax_from_parts(target_logit, self.scale * neg, neg_mask, valid, "none")
        self._record(valid, target, neg, neg_mask, loss=per_row)
        return LF._reduce(per_row, valid, "mean")
