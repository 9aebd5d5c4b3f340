"""Engines for the backbone, registered in ``dsoft_dist.registry.ENGINES`` under ``parallel.engine``:
``ddp`` (engines/ddp.py) and ``deepspeed`` (engines/deepspeed.py). The head is never inside one.

The trainer builds the configured one as ``ENGINES.get(cfg.parallel.engine)(model, optimizer,
head_optimizer, env, cfg)`` and uses only what ``Engine`` below lists. A new engine is a class with
these methods in a module that registers it (``@ENGINES.register("name")``), imported here, or named in
a config's extra modules (``dsoft_dist.registry.import_extra_modules``).
"""
from __future__ import annotations

from typing import ContextManager, Protocol

import torch
from torch import nn

from dsoft_dist.train.engines import ddp, deepspeed  # the built-ins register on import


class Engine(Protocol):
    """The backbone's engine, as ``dsoft_dist.train.update.Updater`` and the trainer use it.

    One update of k micro-batches::

        engine.set_lr(lr)
        for i in range(k):
            with engine.accumulating(last=i == k - 1):
                emb = engine.forward(x)           # (B_local, D)
                ...                               # the head's forward and backward, outside the engine
                engine.backward(emb, grad_emb)    # grad_emb follows dsoft_dist.train.grads
        applied = engine.update(head)             # both optimizers; False when the step was skipped

    Its state is a checkpoint part (``dsoft_dist.train.state``), saved under ``step-N/engine/``:
    either a SnapshotPart (``snapshot(copy)`` / ``write(path, snapshot)``: the DDP engine's optimizer
    and loss scale, which a background save can copy) or a SelfSavingPart (``save(path)``: DeepSpeed's
    collective save of its ZeRO partitions, which makes the save synchronous); ``load`` for both.
    """

    module: nn.Module  # the backbone itself (no wrapper): its weights are saved, verified and exported

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, head_optimizer, env, cfg) -> None:
        """Takes the backbone (moved to ``env.device`` here), its optimizer, the head's optimizer (whose lr
        and update it drives too), the process's DistEnv and the run's Config."""

    def describe(self) -> str:
        """A short name for logs and the report, e.g. ``ddp`` or ``deepspeed ZeRO-2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings (B_local, D) of a micro-batch, under the run's precision."""

    def accumulating(self, last: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward; ``last`` for the update's last one (DDP
        all-reduces the gradients only then)."""

    def backward(self, emb: torch.Tensor, grad_emb: torch.Tensor) -> None:
        """The backbone's backward from the embedding gradient ``grad_emb`` (already scaled by
        ``dsoft_dist.train.grads.embedding_grad_factor``; the engine adds only its loss scale). The
        engine must not divide by the accumulation steps: the loss already is, on both sides."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of both optimizers for the coming update."""

    def update(self, head) -> bool:
        """After the last micro-batch: one overflow decision over the backbone and every head shard (all
        ranks agree), clipping per ``optimizer.clip_scope``, then both optimizers' updates (the head's only
        when it does not update inside backward) and zeroed gradients. Returns False when non-finite
        gradients skipped both, on every rank."""

    def load(self, path: str, saved_world_size: int) -> str | None:
        """Collective: restores the state saved under ``path`` by ``saved_world_size`` ranks, or raises
        CheckpointError naming what to do when it cannot load on this world size."""

__all__ = ["Engine", "ddp", "deepspeed"]
