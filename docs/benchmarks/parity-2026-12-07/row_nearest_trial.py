"""A trial outside the package: D-Softmax-K whose every row also meets its own class's nearest classes.

D-Softmax-KN as first built shared one set of K classes among the batch's rows: half of it went to the nearest
classes of the batch's classes, so with B = 128 rows and about 60 places most rows lost their own nearest classes.
The stratified form below is what ``head.negatives: nearest`` became (docs/results.md); this trial measured it
first, written in plain torch over the union of the rows' sets.

Here every row i keeps the random set of D-Softmax-K (K = ceil(r C_local) per shard, drawn as D-Softmax-K draws it)
and adds N_i: the M nearest classes of its own class y_i from the nearest-class table of
the class weights (``dsoft_dist.head.nearest.NearestTable``, M = 8, rebuilt at the automatic interval). The extra
logits cost B x M x D per step, not the full-class product.

With install(corrected=True) (row_nearest_stratified), the random set's sum stands for all the classes outside N_i (stratified): row i's inter sum is

    sum_{k in N_i} exp(s z_ik) + (C_local - 1 - |N_i|) / |R_i| sum_{k in R_i} exp(s z_ik)

per shard, R_i the random set less N_i and y_i, so a row's push is shared among its negatives about as full
D-Softmax shares it. Without, it is the plain sum over N_i and the random set (the nearest classes take more of
the push than in full D-Softmax).

    PYTHONPATH=docs/benchmarks/parity-2026-12-07 dsoft bench accuracy --parts glyphs --glyph-steps 2400 \
      --seeds 0 --methods d_softmax_k --rates 1/8 --sweep "extra_modules=[row_nearest_stratified]" \
      --sweep optimizer.lr=0.02 --out runs/row-nearest

Only training steps change; evaluation does not use the head.
"""
import math

import torch
import torch.nn.functional as F

from dsoft_dist.head.nearest import NearestTable
from dsoft_dist.head.sharded import ShardedClassifier
from dsoft_dist.observability import get_logger

PER_CLASS = 8
log = get_logger(__name__)
_select_rows = ShardedClassifier.select_rows
_local_stats = ShardedClassifier._local_stats_for


def select_rows_keeping_labels(head, labels_global):
    head._trial_labels = labels_global
    return _select_rows(head, labels_global)


def row_sets(head, labels, rows, target_local):
    """(U sorted local ids, (B, |U|) in N_i, (B, |U|) in R_i, (B,) log of the random part's weight)."""
    table = head.__dict__.setdefault("_trial_table", NearestTable(PER_CLASS, 0))
    table.refresh_if_due(head, labels.numel(), head.draws - 1, head.training)
    ids, _ = table.lookup(head, labels)  # (B, M) global
    local = ids - head.class_start
    mine = (ids >= 0) & (local >= 0) & (local < head.num_local_classes)
    union = torch.cat([rows, local[mine], target_local[target_local >= 0]]).unique()  # sorted
    batch = labels.numel()
    in_n = torch.zeros(batch, union.numel(), dtype=torch.bool, device=union.device)
    row = torch.arange(batch, device=union.device)[:, None].expand_as(ids)
    in_n[row[mine], torch.searchsorted(union, local[mine])] = True
    in_r = torch.isin(union, rows).expand(batch, -1) & ~in_n
    owned = target_local >= 0
    tgt = torch.searchsorted(union, target_local.clamp(min=0))
    in_n[owned, tgt[owned]] = False
    in_r = in_r.clone()
    in_r[owned, tgt[owned]] = False
    others = head.num_local_classes - owned.long() - in_n.sum(1)  # classes outside N_i and y_i on this shard
    log_w = torch.log(others.double() / in_r.sum(1).clamp(min=1).double()).float()
    return union, in_n, in_r, log_w


def install(corrected: bool) -> None:
    def local_stats(head, feats, rows, target_local, valid):
        if not (head.training and rows is not None):
            return _local_stats(head, feats, rows, target_local, valid)
        if not head.normalize:
            raise ValueError("the row-nearest trial is written for the normalized losses")
        if not getattr(head, "_trial_logged", False):
            log.info("row-nearest trial: each row adds its class's %d nearest classes to the random set; "
                     "stratified: %s", PER_CLASS, corrected)
            head._trial_logged = True
        with torch.no_grad():
            union, in_n, in_r, log_w = row_sets(head, head._trial_labels, rows, target_local)
        w = F.normalize(F.embedding(union, head.weight, sparse=True).float(), dim=1)  # (U, D)
        logits = head.scale * feats.float() @ w.T  # (B, U)
        bias = torch.where(in_n, 0.0, torch.where(in_r, log_w[:, None] if corrected else 0.0, -math.inf))
        lse = torch.logsumexp(logits + bias, dim=1)
        owned = target_local >= 0
        tgt = torch.searchsorted(union, target_local.clamp(min=0))
        target = torch.where(owned, (logits / head.scale).gather(1, tgt[:, None]).squeeze(1), 0.0)
        hardest = logits.detach().masked_fill(~(in_n | in_r), -math.inf).amax(dim=1)
        return lse, target, hardest

    ShardedClassifier.select_rows = select_rows_keeping_labels
    ShardedClassifier._local_stats_for = local_stats
