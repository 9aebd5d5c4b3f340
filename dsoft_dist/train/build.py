"""Building a run's pieces from the config: backbone, head, both optimizers, the head-step decision.

    model = build_backbone(cfg)                         # the same initial weights on every rank
    opt = build_backbone_optimizer(model, cfg.optimizer)  # norms and biases without weight decay
    head = build_head(cfg, device)                      # class shard of this rank (DESIGN.md §2)
    head_opt = build_head_optimizer(head, resolve_head_step(cfg))

Nothing here starts processes or moves data between ranks.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dsoft_dist.config.schema import Config, OptimizerConfig
from dsoft_dist.errors import ConfigError
from dsoft_dist.head import ShardedClassifier
from dsoft_dist.models import build_model
from dsoft_dist.observability import get_logger
from dsoft_dist.registry import OPTIMIZERS

log = get_logger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def build_backbone(cfg: Config) -> nn.Module:
    """The backbone initialized from ``cfg.seed`` (every rank builds the same weights)."""
    torch.manual_seed(cfg.seed)
    return build_model(**dataclasses.asdict(cfg.model))  # ModelConfig's fields are build_model's arguments


def backbone_param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: norm weights/PReLU slopes and biases, weight_decay: 0}].

    With ``decay_norm_and_bias`` everything is in the first group. Empty groups are dropped.
    """
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (plain if isinstance(module, _NORMS) or name == "bias" or p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_backbone_optimizer(model: nn.Module, o: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``OPTIMIZERS`` registers under ``o.name`` (sgd: momentum, nesterov; adamw;
    ``dsoft_dist.train.optimizers``) over ``backbone_param_groups``; lr is set per step by the schedule."""
    groups = backbone_param_groups(model, o.weight_decay, o.decay_norm_and_bias)
    return OPTIMIZERS.get(o.name).backbone(groups, o)


def build_head(cfg: Config, device: torch.device, group=None) -> ShardedClassifier:
    """This rank's class shard of the head (WORLD group by default), on ``device``."""
    return ShardedClassifier.from_config(cfg.head, cfg.data.num_classes, cfg.model.embedding_size, group=group,
                                         device=device)


def resolve_head_step(cfg: Config) -> OptimizerConfig:
    """The optimizer config with ``head_step_in_backward`` decided (True or False, never None).

    Unset means on where it is legal: head_mode=sparse, one micro-batch per step, the head
    not clipped, and not fp16 (an overflow must skip the head step with the backbone's).
    An explicit true where it is not legal was already refused by the schema, except for
    head_mode, checked here too.
    """
    o = cfg.optimizer
    reasons = []
    if o.head_mode != "sparse":
        reasons.append("optimizer.head_mode=dense")
    if o.grad_accum_steps > 1:
        reasons.append(f"optimizer.grad_accum_steps={o.grad_accum_steps}")
    if o.grad_clip > 0 and o.clip_scope != "backbone":
        reasons.append(f"optimizer.clip_scope={o.clip_scope}")
    if cfg.parallel.precision == "fp16":
        reasons.append("parallel.precision=fp16")
    if o.head_step_in_backward and reasons:
        raise ConfigError(f"optimizer.head_step_in_backward=True is invalid with {', '.join(reasons)}: set it to "
                          "false (or leave it unset)")
    on = not reasons if o.head_step_in_backward is None else bool(o.head_step_in_backward)
    log.debug("head step inside backward: %s%s", on, f" (off because of {', '.join(reasons)})" if reasons else "")
    return dataclasses.replace(o, head_step_in_backward=on)
