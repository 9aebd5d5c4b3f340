"""Input checks for the sharded head, agreed across ranks so every rank raises the same error.

Each rank summarizes its inputs in a few int64 numbers (batch size, shape/dtype flags,
label min/max); one all-gather shares them and every rank reads the same table on the
host, so a bad label on rank 2 makes all ranks raise "labels on rank 2 contain 40 ..."
instead of rank 2 raising and the others hanging in the next collective. Cost per checked
step: one all-gather of 8 * P int64 and one host read. The head checks its first forward
(``checks="first"``, the default), every forward (``"always"``) or none (``"never"``).
"""
from __future__ import annotations

import torch

from dsoft_dist.losses.functional import label_dtype_problem, label_range_problem
from dsoft_dist.parallel import all_gather_cat


def _summary(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1, 8) int64: [B_emb, emb_dim (or -1), emb_float, labels_int64, B_labels (or -1), lo, hi, labels_1d]."""
    is_int64 = labels.dtype == torch.int64
    lab = labels.reshape(-1) if is_int64 else torch.zeros(0, dtype=torch.int64, device=labels.device)
    if lab.numel():
        lo_hi = torch.stack([lab.min(), lab.max()])
    else:
        lo_hi = torch.zeros(2, dtype=torch.int64, device=labels.device)
    head = torch.tensor([emb.shape[0] if emb.dim() >= 1 else -1, emb.shape[1] if emb.dim() == 2 else -1,
                         int(emb.is_floating_point()), int(is_int64),
                         labels.shape[0] if labels.dim() == 1 else -1], dtype=torch.int64)
    tail = torch.tensor([int(labels.dim() == 1)], dtype=torch.int64)
    return torch.cat([head.to(lo_hi.device), lo_hi, tail.to(lo_hi.device)])[None]


def _errors(rank: int, row: list[int], head, batch0: int) -> str | None:
    b_emb, dim, is_float, is_int64, b_lab, lo, hi, lab_1d = row
    where = f"on rank {rank}"
    if dim < 0:
        return f"local_embeddings {where} must be 2-D (B_local, {head.embedding_size})"
    if dim != head.embedding_size:
        return (f"local_embeddings {where} have dim {dim}, but the head's embedding_size is "
                f"{head.embedding_size}; build the head with embedding_size={dim} or fix the backbone")
    if not is_float:
        return f"local_embeddings {where} must be a floating-point tensor; use .float()"
    if not is_int64:
        return label_dtype_problem(f"labels {where}")
    if not lab_1d or b_lab != b_emb:
        return f"labels {where} must be 1-D with one label per embedding row ({b_emb}), got {b_lab} rows"
    problem = label_range_problem(lo, hi, head.num_classes, f"labels {where}")
    if problem:
        return problem
    if b_emb != batch0:
        return (f"local batch size {b_emb} {where} differs from {batch0} on rank 0; the head needs equal "
                f"local batches on every rank (use drop_last=True in the data loader)")
    return None


def check_inputs(emb: torch.Tensor, labels: torch.Tensor, head, group, counter) -> None:
    """Raises ValueError (the same on every rank) naming the rank and the bad value, or returns."""
    table = all_gather_cat(_summary(emb, labels).to(emb.device), group, counter, "checks").tolist()  # (P, 8)
    for rank, row in enumerate(table):
        message = _errors(rank, row, head, table[0][0])
        if message:
            raise ValueError(message)
