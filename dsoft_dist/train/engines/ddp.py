"""Engines for the backbone: DDP (default) or DeepSpeed ZeRO-1/2. The head is never inside one.

Both expose the same small interface, used by ``dsoft_dist.train.step``:

    emb = engine.forward(images)                 # (B_local, D), under the precision's autocast
    with engine.accumulating(last_micro_batch):  # DDP: no all-reduce before the last micro-batch
        engine.backward(emb, grad_emb)           # the backbone's backward from the embedding gradient
    applied = engine.step(lr, head)              # one overflow decision; clips; steps both optimizers

``grad_emb`` already follows ``dsoft_dist.train.grads`` (global-mean scale, x P for the
engine's average, accumulation); ``divides_by_accum`` tells that module whether this
engine divides by the accumulation steps itself.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from dsoft_dist.observability import get_logger
from dsoft_dist.registry import ENGINES
from dsoft_dist.train.grads import LossScaler, all_finite, clip_grads_

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
    head shard) skips both steps everywhere and halves the scale.
    """

    divides_by_accum = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, head_optimizer, env, cfg):
        from torch.nn.parallel import DistributedDataParallel

        self.module, self.optimizer, self.head_optimizer = model.to(env.device), optimizer, head_optimizer
        self.env, self.precision = env, cfg.parallel.precision
        self.grad_clip, self.clip_scope = cfg.optimizer.grad_clip, cfg.optimizer.clip_scope
        ids = [env.device.index] if env.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.module, device_ids=ids) if env.world_size > 1 else self.module
        self.scaler = LossScaler(enabled=self.precision == "fp16")
        self.last_norms: dict[str, float] = {}

    def describe(self) -> str:
        return "ddp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.env.device):
            return self.net(x)

    def accumulating(self, last: bool):
        """DDP's no_sync for every micro-batch but the last (its backward all-reduces once)."""
        if last or self.net is self.module:
            return contextlib.nullcontext()
        return self.net.no_sync()

    def backward(self, emb: torch.Tensor, grad_emb: torch.Tensor) -> None:
        emb.backward((grad_emb * self.scaler.scale).to(emb.dtype))

    def set_lr(self, lr: float) -> None:
        for opt in (self.optimizer, self.head_optimizer):
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self, head) -> bool:
        """Unscale, one overflow decision, clip, both steps (the head skipped when it steps in backward)."""
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
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    snapshots_state = True  # state_snapshot can copy the state for a background save

    def state_snapshot(self, copy: bool = False) -> dict:
        """{"file", "payload"}: the optimizer and loss scale, replicated under DDP, so rank 0's payload only."""
        from dsoft_dist.utils import cpu_copy

        payload = None
        if self.env.is_main:
            payload = cpu_copy(self.state_dict()) if copy else self.state_dict()
        return {"file": "ddp.pt", "payload": payload}

    def load_state(self, folder: str, same_world: bool) -> None:
        """Any world size: the state does not depend on it."""
        from dsoft_dist.utils import load_weights_only

        self.load_state_dict(load_weights_only(os.path.join(folder, "ddp.pt"), map_location=self.env.device))
