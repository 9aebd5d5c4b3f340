"""Collectives the sharded head issues, as autograd Functions, each counted by a CommCounter.

Plain ``dist.all_gather`` / ``dist.all_reduce`` / ``dist.reduce_scatter`` only (they all
work on gloo and NCCL; the ``*_into_tensor`` and ``torch.distributed.nn`` forms print
deprecation warnings in torch 2.13). Without an initialized process group (and with
``group=None``) every function is the single-process identity, so the head also runs in
one plain process.

    counter = CommCounter()
    emb_global = gather_rows(emb_local, group, counter, "embeddings")  # (P*B, D); backward = reduce-scatter
    total = reduce_replicated(part, group, counter, "stats_sum")       # sum over ranks; backward = identity
    counter.bytes, counter.by_name, counter.events                     # payload bytes this rank moved

Bytes are counted per collective as the size of the buffer the rank receives:
all_gather P * n, reduce_scatter P * n_out (the reduced input list), all_reduce n. What a
ring algorithm puts on each link is (P - 1) / P of the all_gather / reduce_scatter figure
and 2 (P - 1) / P of the all_reduce one (docs/head.md).
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
        self.by_name: dict[str, int] = {}
        self.events: list[tuple[str, str, int]] = []  # (name, op, bytes), one per collective, in order

    def add(self, op: str, nbytes: int, name: str | None = None) -> None:
        name = name or op
        self.bytes += int(nbytes)
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + int(nbytes)
        self.by_name[name] = self.by_name.get(name, 0) + int(nbytes)
        self.events.append((name, op, int(nbytes)))

    def snapshot(self) -> dict:
        """{'bytes', 'calls', 'by_op': {op: bytes}, 'by_name': {name: bytes}, 'events': [(name, op, bytes)]} (a copy)."""
        return {"bytes": self.bytes, "calls": self.calls, "by_op": dict(self.by_op), "by_name": dict(self.by_name),
                "events": list(self.events)}


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


def _count(counter: CommCounter | None, op: str, nbytes: int, name: str | None) -> None:
    if counter is not None:
        counter.add(op, nbytes, name)


def all_gather_cat(x: torch.Tensor, group=None, counter: CommCounter | None = None,
                   name: str | None = None) -> torch.Tensor:
    """Concatenates every rank's ``x`` (same shape on all ranks) along dim 0; no autograd."""
    _, size = group_rank_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    _count(counter, "all_gather", size * _nbytes(x), name)
    return torch.cat(parts, dim=0)


def all_reduce(x: torch.Tensor, op=None, group=None, counter: CommCounter | None = None,
               name: str | None = None) -> torch.Tensor:
    """All-reduces a copy of ``x`` (default SUM) and returns it; the caller's tensor is untouched."""
    _, size = group_rank_size(group)
    if size == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=op or dist.ReduceOp.SUM, group=group)
    _count(counter, "all_reduce", _nbytes(out), name)
    return out


def broadcast(x: torch.Tensor, src: int, group=None, counter: CommCounter | None = None,
              name: str | None = None) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank: ``x`` is the value on ``src`` and a buffer of its shape and dtype
    elsewhere (filled in place and returned); no autograd. Counted on the receiving ranks only."""
    rank, size = group_rank_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    if rank != src:
        _count(counter, "broadcast", _nbytes(x), name)
    return x


def reduce_scatter_rows(x: torch.Tensor, group=None, counter: CommCounter | None = None,
                        name: str | None = None) -> torch.Tensor:
    """Sums ``x`` (P*n, ...) over ranks and returns this rank's block (n, ...)."""
    rank, size = group_rank_size(group)
    if size == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(size, dim=0)]
    out = torch.empty_like(chunks[rank])
    dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=group)
    _count(counter, "reduce_scatter", _nbytes(x), name)
    return out


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward reduce-scatters the gradient to the owner ranks."""

    @staticmethod
    def forward(ctx, x, group, counter, name):
        ctx.group, ctx.counter, ctx.name = group, counter, name
        return all_gather_cat(x, group, counter, name)

    @staticmethod
    def backward(ctx, grad):
        name = ctx.name and ctx.name + "_grad"
        return reduce_scatter_rows(grad.contiguous(), ctx.group, ctx.counter, name), None, None, None


class _ReduceReplicated(torch.autograd.Function):
    """all_reduce SUM for a value consumed by a computation replicated on every rank.

    Every rank computes the same loss L from the sum S = sum_p x_p and calls backward on it,
    so rank p's gradient dL/dx_p = dL/dS is already on rank p: backward is the identity and
    communicates nothing.
    """

    @staticmethod
    def forward(ctx, x, group, counter, name):
        return all_reduce(x, group=group, counter=counter, name=name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def gather_rows(x: torch.Tensor, group=None, counter: CommCounter | None = None, name: str | None = None):
    """(n, ...) per rank -> (P*n, ...) in rank order; the gradient is summed over ranks and scattered back
    (counted as ``name + "_grad"``)."""
    return _GatherRows.apply(x, group, counter, name)


def reduce_replicated(x: torch.Tensor, group=None, counter: CommCounter | None = None, name: str | None = None):
    """sum_p x_p (same shape as ``x``) on every rank; use only when every rank computes the same loss from it."""
    if group_rank_size(group)[1] == 1:
        return x
    return _ReduceReplicated.apply(x, group, counter, name)


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` in rank order, on every rank of ``group`` (small Python values only); [obj] on one."""
    world = group_rank_size(group)[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, group=None):
    """rank 0's ``obj`` on every rank of ``group`` (small Python values only)."""
    if group_rank_size(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
