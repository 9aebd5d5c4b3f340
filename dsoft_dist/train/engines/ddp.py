"""The backbone under DistributedDataParallel (``parallel.engine: ddp``, the default); the head stays outside.

The ``Engine`` of ``dsoft_dist.train.engines``: no DDP wrapper on one rank, DDP's ``no_sync`` for
every micro-batch but the last, the trainer's ``LossScaler`` under fp16, and its state (the
backbone optimizer and the loss scale, the same on every rank) written by rank 0 as
``engine/ddp.pt``, copied to CPU memory for a background save, loadable on any world size.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from dsoft_dist.observability import get_logger
from dsoft_dist.registry import ENGINES
from dsoft_dist.train.grads import LossScaler, all_finite, clip_grads_
from dsoft_dist.utils import atomic_save, cpu_copy, load_weights_only

log = get_logger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The backbone's autocast context for fp32 (none), bf16 or fp16 on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST[precision])


@ENGINES.register("ddp")
class DDPEngine:
    """The backbone under DistributedDataParallel (no wrapper on one rank) with its own optimizer.

    fp16 uses ``LossScaler``: the embedding gradient is multiplied by the scale, the
    backbone's gradients divided by it before clipping; an overflow on any rank (backbone or
    head shard) skips both optimizers' updates everywhere and halves the scale.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, head_optimizer, env, cfg):
        self.module, self.optimizer, self.head_optimizer = model.to(env.device), optimizer, head_optimizer
        self.env, self.precision = env, cfg.parallel.precision
        self.grad_clip, self.clip_scope = cfg.optimizer.grad_clip, cfg.optimizer.clip_scope
        self.net = self.wrap(self.module)
        self.scaler = LossScaler(enabled=self.precision == "fp16")
        self.last_norms: dict[str, float] = {}

    def wrap(self, module: nn.Module) -> nn.Module:
        """What forward and backward run through: ``module`` under DistributedDataParallel on several ranks,
        the module itself on one. An engine that only changes DDP's options overrides this (CONTRIBUTING.md)."""
        if self.env.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.env.device.index] if self.env.device.type == "cuda"
                                       else None)

    def describe(self) -> str:
        """``ddp``."""
        return "ddp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings (B_local, D) under the precision's autocast."""
        with autocast(self.precision, self.env.device):
            return self.net(x)

    def accumulating(self, last: bool):
        """DDP's no_sync for every micro-batch but the last (its backward all-reduces once)."""
        if last or self.net is self.module:
            return contextlib.nullcontext()
        return self.net.no_sync()

    def backward(self, emb: torch.Tensor, grad_emb: torch.Tensor) -> None:
        """The backbone's backward from ``grad_emb`` times the loss scale (1 outside fp16)."""
        emb.backward((grad_emb * self.scaler.scale).to(emb.dtype))

    def set_lr(self, lr: float) -> None:
        """The learning rate of both optimizers."""
        for opt in (self.optimizer, self.head_optimizer):
            for group in opt.param_groups:
                group["lr"] = lr

    def update(self, head) -> bool:
        """Unscale, one overflow decision, clip, both optimizers (the head's skips what it did in backward)."""
        params = list(self.module.parameters())
        head_params = [head.weight]
        self.scaler.unscale_(params)
        finite = all_finite(params + head_params, group=head.group)
        if finite and self.grad_clip > 0:
            self.last_norms = clip_grads_(params, head_params, self.grad_clip, self.clip_scope, head.group)
        if finite:
            self.optimizer.step()
            self.head_optimizer.step()
        elif self.env.is_main:  # the decision is the same on every rank: one line
            log.warning("non-finite gradients (fp16 overflow or bad data): both optimizer steps skipped%s",
                        f"; loss scale now {self.scaler.scale / 2:g}" if self.scaler.enabled else "")
        self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self) -> dict:
        """The backbone optimizer's and the loss scaler's state."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def snapshot(self, copy: bool) -> dict | None:
        """Rank 0's ``state_dict`` (a CPU copy for a background save); None on the others: it is replicated."""
        if not self.env.is_main:
            return None
        return cpu_copy(self.state_dict()) if copy else self.state_dict()

    def write(self, path: str, snapshot: dict | None) -> None:
        """Rank 0 writes ``path/ddp.pt``."""
        if snapshot is not None:
            atomic_save(snapshot, os.path.join(path, "ddp.pt"))

    def load(self, path: str, saved_world_size: int) -> None:
        """Any world size: the state does not depend on it."""
        self.load_state_dict(load_weights_only(os.path.join(path, "ddp.pt"), map_location=self.env.device))
