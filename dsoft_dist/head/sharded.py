"""The model-parallel classifier head: class rows sharded over the ranks of a process group.

    head = dsoft_dist.ShardedClassifier(num_classes=10**6, embedding_size=512, loss="d_softmax",
                                        negatives="random", sample_rate=1 / 64, group=None)
    loss = head(local_embeddings, local_labels)   # (B_local, D), (B_local,) int64 -> global mean
    loss.backward(); head.diagnostics()            # {'intra': ..., 'inter': ..., 'target_cos': ...}

Each rank owns ``weight`` (num_local_classes, D) = classes [class_start, class_start + C_local)
(DESIGN.md §2). A step all-gathers the embeddings and labels, computes its shard's per-row
statistics (``dsoft_dist.head.local``), combines them with two all-reduces (16 B bytes per
rank, whatever the number of ranks) and forms the same loss on every rank
(``dsoft_dist.head.combine``); backward reduce-scatters the embedding gradient to its
owners. Nothing of size O(C) or O(P B) crosses the network besides the gathered batch.
Without torch.distributed initialized the head runs as a single process (P = 1).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsoft_dist.head.backend import (
    describe_local_path,
    env_override,
    get_local_backend,
    local_stats_fn,
    takes_row_updates,
)
from dsoft_dist.head.checks import check_inputs
from dsoft_dist.head.combine import combine_stats, diagnostics_from
from dsoft_dist.head.nearest import NearestTable, with_nearest_rows
from dsoft_dist.head.optim import InBackwardStep
from dsoft_dist.losses.forms import resolve_margins
from dsoft_dist.losses.negatives import NEAREST_DEFAULTS, NEGATIVES, draw_seed, select_shard_classes
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel import CommCounter, all_gather_cat, all_reduce, gather_rows, group_rank_size, shard_range
from dsoft_dist.registry import LOSSES

log = get_logger(__name__)

_INIT_BLOCK = 4096  # rows per init block: the initial weights do not depend on the world size
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # head.compute_dtype; fp32 = the inputs'
CHECKS = ("first", "always", "never")
CHECKS_ENV = "DSOFT_CHECKS"  # overrides the head's checks= (e.g. DSOFT_CHECKS=always to debug a run)


def init_shard_weight(num_classes, embedding_size, class_start, num_local_classes, seed=0, std=0.01,
                      dtype=torch.float32, device=None) -> torch.Tensor:
    """N(0, std^2) rows [class_start, class_start + n) of a (C, D) matrix that is the same for any sharding.

    Rows are drawn in blocks of 4096 global rows, block b from a generator seeded by (seed, b).
    """
    out = torch.empty(num_local_classes, embedding_size, dtype=dtype)
    stop = class_start + num_local_classes
    for block in range(class_start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1 if stop > class_start else 0):
        b0, b1 = block * _INIT_BLOCK, min((block + 1) * _INIT_BLOCK, num_classes)
        gen = torch.Generator().manual_seed(draw_seed(seed, block, 0x1417))
        rows = torch.randn(b1 - b0, embedding_size, generator=gen, dtype=dtype).mul_(std)
        lo, hi = max(b0, class_start), min(b1, stop)
        out[lo - class_start:hi - class_start] = rows[lo - b0:hi - b0]
    return out.to(device) if device is not None else out


class ShardedClassifier(nn.Module):
    """Class-sharded D-Softmax / margin-softmax head with exact or sampled negatives.

    Args: num_classes C, embedding_size D; loss = d_softmax | arcface | cosface | sphereface |
    normface | softmax (linear, unnormalized) | margin (m1, m2, m3 as given) | a loss registered in
    ``dsoft_dist.registry.LOSSES`` (``dsoft_dist.losses.forms``); negatives = all |
    batch | random | partial | nearest (see dsoft_dist.losses.negatives); sample_rate r;
    nearest_per_class, nearest_refresh (negatives="nearest": the nearest classes each row adds to the
    random set, from a table of each class's nearest classes, and the draws between builds of that
    table, 0 = automatic; ``dsoft_dist.head.nearest``); scale s;
    end_point d (None: the loss's preset, ``LOSSES.get(loss).presets``) and inter_weight (D-Softmax; the
    trainer sets inter_weight before each step from the config's inter-weight schedule); inter_correction
    (scale the inter sum by C / |N|, |N| the global number of selected classes; not with nearest, whose
    inter sum is stratified); m1, m2, m3 (None = the preset's);
    seed (negatives: seeded by (seed, draws, rank); init: by (seed, row block)); group (the
    head's process group, default WORLD); chunk_size (classes per chunk, 0 = automatic);
    backend (of the local statistics, dsoft_dist.head.backend: auto | torch | cpu-c |
    triton | a registered name); checks (first | always | never:
    check shapes and labels across ranks on the first forward, on every forward, or not at all;
    a check is one small all-gather and a host read, so ``first`` keeps the steady step free
    of host syncs; True / False mean always / never; the ``DSOFT_CHECKS`` environment
    variable overrides it); logit_cache_mb (keep up
    to this many MiB of the forward's exp'd logit chunks so backward skips recomputing them;
    0 = always recompute, the memory-lean default); compute_dtype (None or torch.bfloat16 /
    float16 / float32: the GEMM operands of the triton backend, which ``backend="auto"`` then
    takes on CUDA even for fp32 inputs; statistics stay fp32; the torch path ignores it). The
    path taken is logged at the first training forward.

    forward(local_embeddings (B_local, D), local_labels (B_local,) int64, -1 = ignore) returns
    the mean loss over the non-ignored rows of the GLOBAL batch, identical on every rank.
    Its gradient w.r.t. each rank's local embeddings is the gradient of that global mean
    (no averaging over ranks happens here). A DDP backbone averages gradients over its P
    ranks, so multiply the loss by P (or scale the backbone gradients) to train with the
    global-mean gradient. The weight gradient is dense for negatives="all" and a sparse COO
    tensor over the touched rows otherwise (use dsoft_dist.head.optim); ``step_in_backward``
    applies the head optimizer inside backward instead (no weight gradient). Every rank must call
    forward and backward the same number of times (they are collective). Local batch sizes
    must be equal on all ranks.
    """

    def __init__(self, num_classes, embedding_size, loss="d_softmax", negatives="all", sample_rate=1.0,
                 scale=64.0, end_point=None, inter_weight=1.0, inter_correction=False, m1=None, m2=None,
                 m3=None, seed=0, group=None, chunk_size=0, backend="auto", checks="first", init_std=0.01,
                 device=None, dtype=torch.float32, logit_cache_mb=0.0, compute_dtype=None,
                 nearest_per_class=NEAREST_DEFAULTS["nearest_per_class"],
                 nearest_refresh=NEAREST_DEFAULTS["nearest_refresh"]):
        super().__init__()
        _check_args(loss, negatives, sample_rate, scale, chunk_size, embedding_size)
        self.group = group
        self.rank, self.world_size = group_rank_size(group)
        self.class_start, self.num_local_classes = shard_range(num_classes, self.world_size, self.rank)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.loss, self.negatives, self.sample_rate = loss, negatives, sample_rate
        self.loss_form = LOSSES.get(loss)  # what combine_stats computes per row (dsoft_dist.losses.forms)
        self.normalize = self.loss_form.normalize
        self.scale = float(scale) if self.normalize else 1.0
        self.end_point = self.loss_form.presets.get("end_point") if end_point is None else end_point
        self.inter_weight, self.inter_correction = inter_weight, inter_correction
        self.m1, self.m2, self.m3 = resolve_margins(loss, m1, m2, m3)
        self.seed, self.chunk_size = seed, chunk_size
        nearest_args = dict(zip(NEAREST_DEFAULTS, (nearest_per_class, nearest_refresh)))
        if negatives != "nearest" and nearest_args != NEAREST_DEFAULTS:
            raise ValueError(f"{nearest_args} are read only with negatives='nearest', not {negatives!r}; leave them "
                             f"at {NEAREST_DEFAULTS} or use 'nearest'")
        if negatives == "nearest" and inter_correction:
            raise ValueError("inter_correction=True is invalid with negatives='nearest': its inter sum already "
                             "weights the random set to stand for the classes outside each row's nearest ones; "
                             "leave it False")
        # negatives="nearest": each class's nearest classes (dsoft_dist.head.nearest); None for the other modes
        self.nearest = NearestTable(nearest_per_class, nearest_refresh) if negatives == "nearest" else None
        self.neighbours = None  # (B, M) the last forward's nearest classes of each row's class (nearest only)
        self.checks = _checks_mode(checks)
        self._checked = False  # a forward has passed the input check
        if logit_cache_mb < 0:
            raise ValueError(f"logit_cache_mb={logit_cache_mb} is invalid: must be >= 0 (0 = always recompute)")
        self.logit_cache_mb = float(logit_cache_mb)
        self.backend = get_local_backend(backend)  # auto | torch | cpu-c | triton | a registered name
        if compute_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype={compute_dtype} is invalid: use None, torch.float32, torch.bfloat16 "
                             "or torch.float16")
        self.compute_dtype = compute_dtype
        self._path_logged = False
        self._row_update = self._grad_hook = None  # set by step_in_backward
        self.weight = nn.Parameter(init_shard_weight(num_classes, embedding_size, self.class_start,
                                                     self.num_local_classes, seed, init_std, dtype, device))
        self.draws = 0  # forwards in training mode (micro-batches); seeds the random negatives
        self.comm = CommCounter()  # bytes moved by this head's collectives (reset it per step to measure)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_num_negatives = 0  # rows of this shard used as negatives in the last forward
        log.debug("class shard %d/%d: classes [%d, %d)", self.rank, self.world_size, self.class_start,
                  self.class_start + self.num_local_classes)

    @classmethod
    def from_config(cls, head_cfg, num_classes: int, embedding_size: int, group=None, **kwargs):
        """Builds the head from a ``dsoft_dist.config.schema.HeadConfig``.

        The margins are the config's resolved ones (``head_cfg.margins()``: the loss preset's,
        with any explicitly given m1/m2/m3 replacing them).
        """
        c = head_cfg
        m1, m2, m3 = c.margins()
        return cls(num_classes, embedding_size, loss=c.loss, negatives=c.negatives, sample_rate=c.sample_rate,
                   scale=c.scale, end_point=c.end_point, inter_weight=c.inter_weight,
                   inter_correction=c.inter_correction, seed=c.seed, group=group, chunk_size=c.chunk_size,
                   backend=c.backend, m1=m1, m2=m2, m3=m3, compute_dtype=_DTYPES[c.compute_dtype],
                   logit_cache_mb=c.logit_cache_mb, nearest_per_class=c.nearest_per_class,
                   nearest_refresh=c.nearest_refresh, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, loss={self.loss}, "
                f"negatives={self.negatives}, sample_rate={self.sample_rate}, class_start={self.class_start}, "
                f"num_local_classes={self.num_local_classes}, rank={self.rank}/{self.world_size}")

    def select_rows(self, labels_global: torch.Tensor) -> torch.Tensor | None:
        """This shard's negative rows for the current draw (sorted local ids; None = all rows).

        With negatives="nearest" the rows are the random set, and it is collective: it builds the table
        when due and keeps the batch classes' rows of it in ``self.neighbours`` (B, M) for the forward
        (every rank must call it with the same labels).
        """
        if self.nearest is not None:
            self.nearest.refresh_if_due(self, labels_global.numel(), self.draws, self.training)
            self.neighbours = self.nearest.lookup(self, labels_global)
        mode = "random" if self.nearest is not None else self.negatives
        return select_shard_classes(mode, labels_global, self.class_start, self.num_local_classes,
                                    self.sample_rate, self.seed, self.draws, self.rank)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """(B_local, D), (B_local,) int64 -> scalar mean loss over the global batch (same on every rank)."""
        if self.checks == "always" or (self.checks == "first" and not self._checked):
            check_inputs(local_embeddings, local_labels, self, self.group, self.comm)
            self._checked = True
        labels = all_gather_cat(local_labels.to(local_embeddings.device), self.group, self.comm, "labels")  # (B,)
        emb = gather_rows(local_embeddings, self.group, self.comm, "embeddings")  # (B, D)
        feats = emb.to(torch.float64 if emb.dtype == torch.float64 else torch.float32)
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        rows = self.select_rows(labels)
        if self.training:
            self.draws += 1

        valid = labels >= 0  # (B,)
        local = labels - self.class_start
        owned = valid & (local >= 0) & (local < self.num_local_classes)
        target_local = torch.where(owned, local, torch.full_like(local, -1))  # (B,)
        lse, target, hardest = self._local_stats_for(feats, rows, target_local, valid)
        if self.nearest is not None:  # each row's nearest classes join its random set (dsoft_dist.head.nearest)
            lse, hardest = with_nearest_rows(lse, hardest, feats, self.weight, self.neighbours, rows, target_local,
                                             self.scale, self.class_start, self.normalize)
        loss, terms, hardest = combine_stats(lse, target, hardest, owned=owned, valid=valid, head=self,
                                             log_correction=self._log_correction(rows, labels.device),
                                             group=self.group, counter=self.comm)
        self.last_num_negatives = self.num_local_classes if rows is None else rows.numel()
        self.last_stats = diagnostics_from(terms, hardest, valid, self.scale)
        return loss

    def _local_stats_for(self, feats, rows, target_local, valid):
        """This shard's (lse, target, max) (B,) each, from the selected backend (logged once)."""
        local_args = (feats, self.weight, rows, target_local, valid, self.scale, self.normalize)
        kwargs = {"chunk_size": self.chunk_size, "logit_cache_mb": self.logit_cache_mb}
        if self.compute_dtype is not None:
            kwargs["compute_dtype"] = self.compute_dtype
        if not self._path_logged and self.training:
            (log.info if self.rank == 0 else log.debug)(  # one line for the run, not one per rank
                "head class shard %d/%d: %s", self.rank, self.world_size,
                describe_local_path(self.backend, feats, self.weight, self.compute_dtype))
            self._path_logged = True
        fn = local_stats_fn(self.backend)
        # nearest: the rows' step waits for the nearest classes' gradient too (the weight's grad hook takes it)
        if self._row_update is not None and self.nearest is None and torch.is_grad_enabled() and \
                self.weight.requires_grad and takes_row_updates(self.backend, feats, self.weight, self.compute_dtype):
            return fn(*local_args, row_update=self._row_update, **kwargs)
        return fn(*local_args, **kwargs)

    def step_in_backward(self, optimizer) -> None:
        """Applies ``optimizer``'s step to the shard inside backward (None: back to ``weight.grad``).

        ``optimizer`` is the head's row-sparse optimizer (``build_head_optimizer``, head_mode
        "sparse"). Each backward through the head then updates every touched row once and
        leaves ``weight.grad`` None, so ``optimizer.step()`` has nothing left to do for the
        head; the result equals ``backward(); optimizer.step()`` to rounding. On the torch
        chunked path each row is updated as soon as its chunk's gradient is complete, while
        the row is still in cache, and no (C_local, D) gradient is allocated (2 GiB at
        C_local = 10^6, D = 512); with the Triton kernels (or another registered backend) the
        step runs from a post-accumulate-grad hook right after the weight gradient lands.
        Each backward is one optimizer step, so gradient accumulation over micro-batches and
        clipping of the head's gradient are not available in this mode.
        """
        if self._grad_hook is not None:
            self._grad_hook.remove()
        self._row_update = self._grad_hook = None
        if optimizer is None:
            return
        if getattr(optimizer, "mode", None) != "sparse" or not hasattr(optimizer, "update_rows"):
            raise ValueError(f"step_in_backward needs a row-sparse head optimizer with head_mode='sparse' "
                             f"(dsoft_dist.head.build_head_optimizer), got {type(optimizer).__name__} "
                             f"with mode={getattr(optimizer, 'mode', None)!r}")
        if not any(p is self.weight for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("step_in_backward: the optimizer does not hold this head's weight; build it with "
                             "build_head_optimizer(head, cfg)")
        epilogues = None
        if self.backend == "cpu-c":  # the SGD tail runs in the same compiled code as the chunks' passes
            from dsoft_dist.kernels.cpu import cpu_epilogues
            epilogues = cpu_epilogues()
        self._row_update = InBackwardStep(optimizer, self.weight, epilogues)
        # the hook lives in the weight's C++ hook table, which Python's garbage collector cannot
        # traverse: a strong reference there would keep the optimizer (and through it the weight and
        # its momentum) alive forever after the head and the optimizer are dropped
        step = weakref.WeakMethod(optimizer.step_and_clear)
        self._grad_hook = self.weight.register_post_accumulate_grad_hook(lambda p: step()(p))

    def _log_correction(self, rows, device):
        """log(C / |N|) with |N| the global number of selected classes (one O(1) all-reduce), or None."""
        if not self.inter_correction or rows is None:
            return None
        count = all_reduce(torch.full((), float(rows.numel()), dtype=torch.float64, device=device),
                           group=self.group, counter=self.comm, name="inter_correction")
        return (math.log(self.num_classes) - torch.log(count.clamp(min=1.0))).float()

    def diagnostics(self) -> dict[str, float]:
        """The last forward's row means as floats (reads values to the host: call outside the step)."""
        return {k: float(v) for k, v in self.last_stats.items()}

    def state_dict(self, *args, **kwargs) -> dict:
        """This rank's piece of the world-size-independent head state (see dsoft_dist.head.state)."""
        from dsoft_dist.head.state import head_piece
        return head_piece(self)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Loads this rank's rows from one piece or a list of pieces written by any number of ranks."""
        from dsoft_dist.head.state import load_head_pieces
        load_head_pieces(self, state)


def _checks_mode(value) -> str:
    """first | always | never from the argument (True / False: always / never), or the DSOFT_CHECKS override."""
    value = ("always" if value else "never") if isinstance(value, bool) else value
    value = env_override(CHECKS_ENV, CHECKS, value, "checks")
    if value not in CHECKS:
        raise ValueError(f"checks={value!r} is invalid; use one of {', '.join(CHECKS)} (first: check the "
                         "first forward's inputs across ranks)")
    return value


def _check_args(loss, negatives, sample_rate, scale, chunk_size, embedding_size):
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is invalid; use one of {', '.join(LOSSES.names())} (or register yours in "
                         "dsoft_dist.registry.LOSSES)")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives={negatives!r} is invalid; use one of {', '.join(NEGATIVES)}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} is invalid: must be in (0, 1], e.g. 1/64")
    if not scale > 0:
        raise ValueError(f"scale={scale} is invalid: must be > 0 (32 or 64 are usual)")
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size} is invalid: must be >= 0 (0 = automatic)")
    if embedding_size < 1:
        raise ValueError(f"embedding_size={embedding_size} is invalid: must be >= 1")
