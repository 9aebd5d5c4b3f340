"""The gradient conventions between the head and the backbone's engine, owned here and only here.

1. Scale of the embedding gradient. The head's loss L is the mean over the GLOBAL batch, so
   the gradient it hands back for this rank's embeddings is already the global mean's. The
   engine (DDP or DeepSpeed) then AVERAGES the backbone's gradients over the P ranks, so the
   embedding gradient is multiplied by P first. With k micro-batches per step each
   micro-batch's loss is divided by k (head and backbone alike), and no engine divides by k
   again (DeepSpeed >= 0.18.3 would, through hooks on its outputs: its engine runs backward
   with ``scale_wrt_gas=False``):

       grad_emb_to_engine = dL/d(emb) / k * P

2. Loss scaling (fp16). The head runs in fp32 from a detached copy of the embeddings, so
   its gradients never carry a loss scale; only the backbone's backward is scaled
   (``LossScaler`` under DDP, DeepSpeed's own scaler under DeepSpeed).
3. One overflow decision. Non-finite gradients anywhere (backbone or any rank's class shard)
   skip BOTH optimizers' updates on every rank (``all_finite`` all-reduces the verdict).
4. Clipping. ``clip_scope`` backbone | head | both: the head's norm is the global norm over
   all class shards (sparse gradients count their stored rows), "both" clips one norm over
   the backbone and the head together.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from dsoft_dist.parallel import group_rank_size


def embedding_grad_factor(world_size: int) -> float:
    """The factor applied to dL/d(emb) before the backbone's backward (see the module doc, item 1): P.

    ``dL/d(emb)`` here already includes the 1/k of the micro-batch loss.
    """
    return float(world_size)


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        out.append(g.coalesce().values() if g.is_sparse else g)
    return out


def local_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum of squared gradient entries over ``params`` (fp32 scalar; sparse gradients: their stored rows)."""
    grads = _grads(params)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def _multi_rank(group) -> bool:
    return group_rank_size(group)[1] > 1


def _collective_device(group) -> torch.device:
    """Where a small all-reduce must live: the current CUDA device under nccl, the CPU under gloo."""
    if _multi_rank(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_finite(params: Iterable[torch.Tensor], group=None) -> bool:
    """True when every gradient of ``params`` is finite on EVERY rank of ``group`` (one all-reduce).

    One host read: call it once per optimizer step.
    """
    grads = _grads(params)
    bad = torch.zeros((), dtype=torch.float32, device=_collective_device(group))
    if grads:
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().to(bad.device)
    if _multi_rank(group):
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad.item() == 0.0)


def global_grad_norm(backbone: Iterable[torch.Tensor], head: Iterable[torch.Tensor], group=None) -> tuple[float, float]:
    """(backbone norm, head norm): the backbone's gradients are replicated (already all-reduced);
    the head's squared norm is summed over the class shards of ``group``."""
    bb = local_sq_norm(backbone)
    hd = local_sq_norm(head).to(_collective_device(group))
    if _multi_rank(group):
        dist.all_reduce(hd, group=group)
    return math.sqrt(float(bb)), math.sqrt(float(hd))


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiplies every gradient of ``params`` (dense or sparse) by ``factor`` in place."""
    if factor == 1.0:
        return
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad * factor
        else:
            p.grad.mul_(factor)


def clip_grads_(backbone: list, head: list, max_norm: float, scope: str, group=None) -> dict[str, float]:
    """Clips the gradients in ``scope`` to ``max_norm``; returns the norms before clipping.

    backbone: replicated parameters; head: this rank's class-shard parameters (their norm is
    global over ``group``). scope backbone | head | both (one coefficient for both).
    """
    bb_norm, head_norm = global_grad_norm(backbone if scope != "head" else [], head if scope != "backbone" else [],
                                          group)
    eps = 1e-6
    if scope == "both":
        total = math.sqrt(bb_norm ** 2 + head_norm ** 2)
        coef = min(1.0, max_norm / (total + eps))
        scale_grads_(backbone + head, coef)
    elif scope == "backbone":
        scale_grads_(backbone, min(1.0, max_norm / (bb_norm + eps)))
    else:
        scale_grads_(head, min(1.0, max_norm / (head_norm + eps)))
    return {"grad_norm_backbone": bb_norm, "grad_norm_head": head_norm}


class LossScaler:
    """Dynamic fp16 loss scale: halve on overflow (the step is skipped), double after ``growth_interval`` good steps.

    The trainer multiplies the backbone's embedding gradient by ``scale`` before its backward
    and divides the backbone's gradients by it after (``unscale_``). Its state is part of the
    run state (``state_dict``).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000, enabled: bool = True):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0  # optimizer steps skipped on overflow so far

    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        """Divides the gradients by the scale the backward ran with."""
        if self.enabled:
            scale_grads_(params, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After the step: back off on overflow, grow after growth_interval finite steps."""
        if not self.enabled:
            if not finite:
                self.skipped += 1
            return
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2.0, 1.0), 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = min(self.scale * 2.0, 2.0 ** 24), 0

    def state_dict(self) -> dict:
        """The scale, the good steps since the last change, the skipped steps, whether it is on."""
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned."""
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped, self.enabled = int(state["skipped"]), bool(state["enabled"])
