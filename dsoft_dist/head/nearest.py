"""The sharded head's table of nearest classes, for ``negatives="nearest"`` (D-Softmax-KN).

D-Softmax-K draws its K negatives at random, so a row meets the class nearest to its own on one step
in 1 / r only; where that class carries much of the row's inter gradient, the sampled run trails
full D-Softmax (docs/results.md). D-Softmax-KN keeps the random set and adds, for each row i, N_i: the
M nearest classes of the row's own class, read from a table built from the class weights, not from
the step's (B, C) logits (the product sampling avoids):

    table = NearestTable(per_class=8, refresh=0)    # the head holds one when negatives="nearest"
    table.refresh_if_due(head, global_batch, draw)  # collective: every rank builds its rows' part
    ids = table.lookup(head, labels)                # (B, M) global ids of each row's class's nearest classes
    lse, hardest = with_nearest_rows(lse, hardest, feats, head.weight, ids, rows, target_local, ...)

Row c of the table lists the M classes whose weights have the highest cosine with class c's weight
(c itself left out), over all C classes: a rank builds the rows of its own classes, receiving every
other shard's normalized weights in turn (one broadcast per shard, C x D values per rank in all) and
keeping a running top M over tiles of at most TILE_ROWS x TILE_COLS cosines. The table's rows are
keyed by class like the weight's, so they are saved in the head's pieces and load on any world size.

On each shard, row i's inter sum is stratified: its nearest classes exactly, and the random set
R_i (the shard's K rows less N_i and y_i) standing for every other class of the shard,

    S_i = sum_{k in N_i} exp(l_ik) + (C_local - |N_i| - [y_i here]) / |R_i| sum_{k in R_i} exp(l_ik),

an unbiased estimate of the shard's full sum, so the row's push is shared among its negatives about
as full D-Softmax shares it (``with_nearest_rows``; the shards' sums add up in ``combine_stats``).
The N_i part costs B M D per step (a gather and a dot per pair), not B K D.

A build costs 2 C_local C D flops per rank; one sampled step's head GEMMs about 6 B K_local D. The
table is rebuilt every ``refresh`` training draws; refresh=0 picks the interval at the first build
that keeps the builds' share at AUTO_SHARE of the sampled steps' GEMM work:
ceil(C_local C / (3 AUTO_SHARE B K_local)), 209 draws at C = 1,000, B = 128, r = 1/8.
A lookup is one all-reduce of 8 B M bytes per step (every rank gets each batch class's row of ids
from the rank that owns the class).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsoft_dist.losses.negatives import num_sampled
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel import all_reduce, broadcast, shard_ranges

log = get_logger(__name__)

AUTO_SHARE = 0.1  # refresh=0: the builds cost this share of the sampled steps' head GEMMs
TILE_ROWS, TILE_COLS = 2048, 8192  # cosines held at once while building (64 MiB in fp32)


def auto_refresh(num_classes: int, num_local_classes: int, global_batch: int, sample_rate: float) -> int:
    """Draws between builds so that building costs AUTO_SHARE of the sampled steps' head GEMM work."""
    k_local = num_sampled(num_local_classes, sample_rate)
    return max(1, math.ceil(num_local_classes * num_classes / (3 * AUTO_SHARE * global_batch * k_local)))


def top_cosines(queries: torch.Tensor, keys: torch.Tensor, per_class: int, query_start: int, key_start: int,
                best: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top ``per_class`` of each query row over ``keys``: (ids (Q, M) global, cos (Q, M)), highest first.

    queries (Q, D) and keys (K, D) are unit rows of global classes starting at query_start and key_start; a
    query's own class is left out. ``best`` is the running result over earlier keys (None: none yet).
    """
    q = queries.shape[0]
    if best is None:
        best = (torch.full((q, per_class), -1, dtype=torch.int64, device=queries.device),
                torch.full((q, per_class), -math.inf, dtype=torch.float32, device=queries.device))
    ids_out, cos_out = [], []
    for r0 in range(0, q, TILE_ROWS):
        rows = slice(r0, min(q, r0 + TILE_ROWS))
        ids, cos = best[0][rows], best[1][rows]
        row_ids = torch.arange(query_start + r0, query_start + rows.stop, device=queries.device)
        for c0 in range(0, keys.shape[0], TILE_COLS):
            tile = (queries[rows] @ keys[c0:c0 + TILE_COLS].T).float()  # (R, S)
            col_ids = torch.arange(key_start + c0, key_start + c0 + tile.shape[1], device=queries.device)
            tile = tile.masked_fill(row_ids[:, None] == col_ids[None, :], -math.inf)
            cos, pick = torch.cat([cos, tile], dim=1).topk(per_class, dim=1)
            ids = torch.cat([ids, col_ids.expand(tile.shape[0], -1)], dim=1).gather(1, pick)
        ids_out.append(ids)
        cos_out.append(cos)
    return torch.cat(ids_out), torch.cat(cos_out)


class NearestTable:
    """Each of a shard's classes' ``per_class`` nearest classes (global ids and cosines), rebuilt every ``refresh``
    training draws (0: automatic, see ``auto_refresh``)."""

    def __init__(self, per_class: int = 8, refresh: int = 0):
        if per_class < 1:
            raise ValueError(f"nearest_per_class={per_class} is invalid: must be >= 1 (8 is usual)")
        if refresh < 0:
            raise ValueError(f"nearest_refresh={refresh} is invalid: must be >= 0 (0 = automatic)")
        self.per_class, self.refresh = per_class, refresh
        self.clear()

    def clear(self) -> None:
        """Forgets the table: the next forward builds it."""
        self.ids = self.cos = None
        self.built_at = -1  # the draw at which the table was built
        self.every = self.refresh  # the interval in draws (set at the first build when refresh is 0)

    def width(self, num_classes: int) -> int:
        """M: the nearest classes a row of the table holds (per_class, at most the C - 1 other classes)."""
        return min(self.per_class, num_classes - 1)

    def refresh_if_due(self, head, global_batch: int, draw: int, training: bool) -> bool:
        """Builds the table if there is none, or at a training draw ``every`` draws after the last build
        (collective: every rank calls it with the same arguments)."""
        if self.every == 0:
            self.every = auto_refresh(head.num_classes, head.num_local_classes, global_batch, head.sample_rate)
        if self.ids is not None and not (training and draw - self.built_at >= self.every):
            return False
        if self.ids is None and head.rank == 0:
            log.info("nearest-class table: %d classes per class, built every %d draws%s; each row adds its "
                     "class's nearest classes to the random set", self.width(head.num_classes), self.every,
                     " (automatic)" if not self.refresh else "")
        self.build(head)
        self.built_at = draw
        return True

    @torch.no_grad()
    def build(self, head) -> None:
        """Row c of this shard: the per_class classes of highest weight cosine with c over all C classes."""
        per_class = self.width(head.num_classes)
        if per_class < 1:
            raise ValueError(f"negatives='nearest' needs at least 2 classes, got num_classes={head.num_classes}")
        mine = F.normalize(head.weight.detach().float(), dim=1)
        best = None
        for src, (start, count) in enumerate(shard_ranges(head.num_classes, head.world_size)):
            keys = mine if src == head.rank else torch.empty(count, mine.shape[1], device=mine.device)
            keys = broadcast(keys, src, head.group, head.comm, "nearest_build")
            best = top_cosines(mine, keys, per_class, head.class_start, start, best)
        self.ids, self.cos = best

    def lookup(self, head, labels: torch.Tensor) -> torch.Tensor:
        """(B, M) global ids of the nearest classes of each row's class (-1 for an ignored row).

        Each rank fills the rows whose class it owns (ids + 1, zeros elsewhere); one int64 all-reduce (SUM)
        gives every rank all of them.
        """
        local = labels - head.class_start
        owned = (labels >= 0) & (local >= 0) & (local < head.num_local_classes)
        packed = torch.zeros(labels.shape[0], self.ids.shape[1], dtype=torch.int64, device=labels.device)
        packed[owned] = self.ids[local[owned]] + 1
        return all_reduce(packed, group=head.group, counter=head.comm, name="nearest") - 1

    def rows(self) -> dict[str, torch.Tensor]:
        """The table as rows keyed by class, for the head's state pieces (empty before the first build)."""
        return {} if self.ids is None else {"nearest_ids": self.ids, "nearest_cos": self.cos}

    def state(self) -> dict:
        """What the head's state piece keeps of the table besides its rows."""
        return {"nearest_built_at": self.built_at, "nearest_every": self.every, "nearest_refresh": self.refresh}

    def load(self, ids: torch.Tensor | None, cos: torch.Tensor | None, saved: dict, num_classes: int,
             device) -> None:
        """Takes a saved head's table rows and ``state()``; with none, or rows of another width, the next
        forward builds the table anew."""
        if ids is None or ids.shape[1] != self.width(num_classes):
            self.clear()
            return
        self.ids, self.cos = ids.to(device), cos.to(device)
        self.built_at = saved["nearest_built_at"]
        same_rule = self.refresh == saved["nearest_refresh"]  # the interval the saved run used still applies
        self.every = saved["nearest_every"] if same_rule else self.refresh


def with_nearest_rows(lse: torch.Tensor, hardest: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor,
                      neighbours: torch.Tensor, rows: torch.Tensor, target_local: torch.Tensor, scale: float,
                      class_start: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's (lse, hardest) (B,) with each row's nearest classes, from the random set's.

    lse (B,): log sum over ``rows`` (the shard's random set, sorted local ids) less the row's target, from
    the head's backend; hardest (B,) its largest logit. feats (B, D) (unit rows with ``normalize``, whose
    logits are scale times cosines; raw logits without), weight (C_local, D) raw,
    neighbours (B, M) global ids (-1: none), target_local (B,) (-1: not this shard's). Returns
    log S_i (see the module's docstring; -inf where the shard has no negative for the row) and the
    largest logit over N_i and the random set. Only the shard's N_i rows get a weight gradient from
    here (a sparse one, added to the backend's).
    """
    num_local = weight.shape[0]
    local = neighbours - class_start
    mine = (neighbours >= 0) & (local >= 0) & (local < num_local)  # (B, M): N_i on this shard
    pair_row, pair_col = mine.nonzero(as_tuple=True)
    ids = local[pair_row, pair_col]
    w = F.embedding(ids, weight, sparse=True).to(feats.dtype)  # (n, D), a sparse gradient over the N_i rows
    if normalize:
        w = F.normalize(w, dim=1)
    logits = torch.full(mine.shape, -math.inf, dtype=feats.dtype, device=feats.device)
    logits = logits.index_put((pair_row, pair_col), scale * (feats[pair_row] * w).sum(dim=1))  # (B, M)
    in_rows = torch.zeros_like(mine)
    in_rows[pair_row, pair_col] = torch.isin(ids, rows)
    owned = target_local >= 0
    target_in_rows = owned & torch.isin(target_local, rows)
    n_near = mine.sum(dim=1)  # |N_i| (the table never names a row's own class)
    n_random = rows.numel() - target_in_rows.long() - in_rows.sum(dim=1)  # |R_i|
    others = num_local - owned.long() - n_near  # the shard's classes outside N_i and y_i
    ratio = torch.where(n_random > 0, others / n_random.clamp(min=1), 0.0)  # (B,)
    # S = ratio sum_rows + sum_{N_i} (1 - ratio [k in rows]) exp(l): rows less N_i weighted, N_i exactly once
    # in float64: the N_i in rows enter with 1 - ratio < 0, and ratio reaches C_local / |R_i|
    ratio, lse64, logits64 = ratio.double(), lse.double(), logits.double()
    coef = torch.where(in_rows, 1.0 - ratio[:, None], 1.0)  # (B, M)
    shift = torch.maximum(lse64 + torch.log(ratio), logits64.amax(dim=1)).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = ratio * torch.exp(lse64 - shift) + (coef * torch.exp(logits64 - shift[:, None])).sum(dim=1)
    positive = total > 0
    out = torch.where(positive, shift + torch.log(torch.where(positive, total, torch.ones_like(total))), -math.inf)
    return out.to(lse.dtype), torch.maximum(hardest, logits.detach().amax(dim=1).to(hardest.dtype))
