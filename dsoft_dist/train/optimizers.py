"""The optimizers ``optimizer.name`` names (sgd, adamw), registered in ``dsoft_dist.registry.OPTIMIZERS``:
each builds both the backbone's torch optimizer and the head's row-sparse one from an ``OptimizerConfig``.

    spec = OPTIMIZERS.get("sgd")
    opt = spec.backbone(param_groups, cfg.optimizer)               # torch.optim.SGD over the groups
    head_opt = spec.head([head.weight], cfg.optimizer, shard)       # RowSparseSGD, shard: mode, num_classes,
                                                                    # class_start (dsoft_dist.head.optim)

``dsoft_dist.train.build.build_backbone_optimizer`` and ``dsoft_dist.head.build_head_optimizer`` are the
lookups. The learning rate is set per step by the schedule; each group's weight_decay is its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dsoft_dist.head.optim import RowSparseAdamW, RowSparseSGD
from dsoft_dist.registry import OPTIMIZERS


@dataclass(frozen=True, eq=False)
class OptimizerSpec:
    """backbone(param_groups, cfg) -> torch.optim.Optimizer; head(params, cfg, shard) -> a row-sparse optimizer
    over the class shard (``shard``: dict(mode, num_classes, class_start)), both from an OptimizerConfig."""

    backbone: Callable[[list, object], torch.optim.Optimizer]
    head: Callable[[list, object, dict], torch.optim.Optimizer]


def _sgd_backbone(groups: list[dict], o) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def _sgd_head(params: list, o, shard: dict) -> RowSparseSGD:
    return RowSparseSGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov,
                        **shard)


def _adamw_backbone(groups: list[dict], o) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def _adamw_head(params: list, o, shard: dict) -> RowSparseAdamW:
    return RowSparseAdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **shard)


OPTIMIZERS.register("sgd", OptimizerSpec(_sgd_backbone, _sgd_head))  # momentum, nesterov, coupled decay
OPTIMIZERS.register("adamw", OptimizerSpec(_adamw_backbone, _adamw_head))  # decoupled decay
