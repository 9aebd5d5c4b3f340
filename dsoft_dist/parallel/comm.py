"""Collectives the sharded head issues, as autograd Functions, each counted by a CommCounter.

Plain ``dist.all_gather`` / ``dist.all_reduce`` / ``dist.reduce_scatter`` only (they all
work on gloo and NCCL; the ``*_into_tensor`` and ``torch.distributed.nn`` forms print
deprecation warnings in torch 2.13). Without an initialized process group (and with
``group=None``) every function is the single-process identity, so the head also runs in
one plain process.

    counter = CommCounter()
    emb_global = gather_rows(emb_local, group, counter)     # (P*B, D); backward = reduce-scatter
    stats = gather_replicated(stats_local, group, counter)  # (P, ...); backward = own slice
    counter.bytes                                           # payload bytes this rank moved

Bytes are counted per collective as the size of the buffer the rank receives:
all_gather P * n, reduce_scatter P * n_out (the reduced input list), all_reduce n.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class CommCounter:
    """Counts the collectives issued through this module: calls and payload bytes, per op."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zeroes every count (call at the start of the step you want to measure)."""
        self.bytes = 0
        self.calls = 0
        self.by_op: dict[str, int] = {}

    def add(self, op: str, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + int(nbytes)

    def snapshot(self) -> dict:
        """{'bytes': int, 'calls': int, 'by_op': {op: bytes}} (a copy)."""
        return {"bytes": self.bytes, "calls": self.calls, "by_op": dict(self.by_op)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_rank_size(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    if group is not None:
        raise ValueError("a process group was passed but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first or pass group=None")
    return 0, 1


def _count(counter: CommCounter | None, op: str, nbytes: int) -> None:
    if counter is not None:
        counter.add(op, nbytes)


def all_gather_cat(x: torch.Tensor, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenates every rank's ``x`` (same shape on all ranks) along dim 0; no autograd."""
    _, size = group_rank_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    _count(counter, "all_gather", size * _nbytes(x))
    return torch.cat(parts, dim=0)


def all_reduce(x: torch.Tensor, op=None, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """All-reduces a copy of ``x`` (default SUM) and returns it; the caller's tensor is untouched."""
    _, size = group_rank_size(group)
    if size == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=op or dist.ReduceOp.SUM, group=group)
    _count(counter, "all_reduce", _nbytes(out))
    return out


def reduce_scatter_rows(x: torch.Tensor, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """Sums ``x`` (P*n, ...) over ranks and returns this rank's block (n, ...)."""
    rank, size = group_rank_size(group)
    if size == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(size, dim=0)]
    out = torch.empty_like(chunks[rank])
    dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=group)
    _count(counter, "reduce_scatter", _nbytes(x))
    return out


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward reduce-scatters the gradient to the owner ranks."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return all_gather_cat(x, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad.contiguous(), ctx.group, ctx.counter), None, None


class _GatherReplicated(torch.autograd.Function):
    """all_gather (stacked on a new dim 0) for values consumed by a computation replicated on every rank.

    Every rank computes the same function of the gathered tensor and calls backward on
    it, so rank p's own gradient is already complete on rank p: backward keeps its slice
    and communicates nothing.
    """

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.rank, _ = group_rank_size(group)
        return all_gather_cat(x.unsqueeze(0), group, counter)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None


def gather_rows(x: torch.Tensor, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """(n, ...) per rank -> (P*n, ...) in rank order; the gradient is summed over ranks and scattered back."""
    return _GatherRows.apply(x, group, counter)


def gather_replicated(x: torch.Tensor, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """(...) per rank -> (P, ...); use only when every rank computes the same loss from the result."""
    return _GatherReplicated.apply(x, group, counter)
