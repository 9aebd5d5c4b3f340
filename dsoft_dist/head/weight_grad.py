"""The shard's weight gradient, collected chunk by chunk: dense, row values, or row updates.

``WeightGrad`` receives each chunk's complete (k, D) row gradient from the backward loop
(``dsoft_dist.head.local``): into a dense (C_local, D) gradient when every row is a column,
into (K + B, D) row values when the columns are sampled rows, or handed to ``row_update``
(the step in backward: an optimizer applied to the rows, no gradient kept). The owned
targets outside the sampled rows get B fixed slots (``OutsideTargets``), so no size is read
back to the host.
"""
from __future__ import annotations

import torch

from dsoft_dist.head.chunks import normalize_backward_, target_rows
from dsoft_dist.head.optim import product_gradient


class WeightGrad:
    """Collects the weight gradient: dense (C_local, D), values over the touched rows only, or
    row updates handed to ``row_update`` (the step in backward: no gradient is kept).

    Each row's gradient is complete when its chunk is done: the chunk's GEMM includes the
    targets inside it, and owned targets outside every chunk get their own rows. With a row
    list the values are (K + B, D): the K rows in order (each chunk writes its slice in place),
    then one slot per batch row for the owned targets outside the rows (``OutsideTargets``),
    so their sizes are known without reading anything back to the host; the sparse gradient
    is then uncoalesced (unused slots add zeros to rows[0]).
    """

    def __init__(self, weight, rows, target_local, tpos, dtype, row_update=None):
        self.shape, self.rows, self.dtype, self.row_update = weight.shape, rows, weight.dtype, row_update
        self.dense = self.values = None
        if row_update is not None:
            return
        if rows is None:
            self.dense = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # every row written once
        else:
            self.values = torch.empty(rows.numel() + target_local.numel(), weight.shape[1], dtype=dtype,
                                      device=weight.device)

    def chunk_out(self, c0, k, ws):
        """Where the chunk's (k, D) gradient is computed: its rows of the dense gradient or of the values, or a
        buffer (row updates)."""
        if self.dense is not None:
            return self.dense[c0:c0 + k]
        return self.values[c0:c0 + k] if self.values is not None else ws.grad_view(k)

    def commit_product(self, c0, lhs, rhs, row_coef, values, ws):
        """The chunk's rows get the gradient lhs (k, B) @ rhs (B, D) + row_coef (k,)[:, None] * values (k, D)
        (row_coef None: the product alone); ``values`` are the rows' current values.

        A step in backward that takes the product form (``row_update.product``) applies it
        itself; otherwise the gradient is formed in the chunk's output and committed.
        """
        product = getattr(self.row_update, "product", None)
        chunk_rows = None if self.rows is None else self.rows[c0:c0 + lhs.shape[0]]
        if product is not None:
            product(lhs, rhs, row_coef, values, rows=chunk_rows, start=c0, out=ws.grad_view(lhs.shape[0]))
            return
        self.commit_chunk(c0, product_gradient(lhs, rhs, row_coef, values, self.chunk_out(c0, lhs.shape[0], ws)))

    def commit_chunk(self, c0, grad, src=None):
        """The chunk's rows (distinct, not yet written) get their whole gradient ``grad`` (k, D), which was
        computed in ``chunk_out`` (the dense gradient or the values: nothing left to do). ``src``: the chunk's
        rows as the loop read them; a gathered copy in the weight's dtype is handed to the step in backward,
        which works in it instead of gathering the rows again (the loop is done with it)."""
        if self.row_update is None:
            return
        if self.rows is None:
            self.row_update(grad, rows=None, start=c0)
            return
        values = src if src is not None and src.dtype == self.dtype else None
        self.row_update(grad, rows=self.rows[c0:c0 + grad.shape[0]], start=c0, values=values)

    def add_outside_rows(self, outside: "OutsideTargets", grad):
        """Owned targets outside the columns: ``grad`` (B, D) holds each batch row's gradient for its target
        (zero for the other rows); each distinct target row gets the sum of its entries."""
        summed = outside.sum(grad)  # (B, D) one slot per distinct outside target, the rest zero
        if self.row_update is not None:  # one update per distinct row; unused slots are left unchanged
            self.row_update(summed, rows=outside.slot_rows, mask=outside.used)
        else:
            self.values[self.rows.numel():] = summed

    def finish(self, outside=None):
        """The weight gradient (None with row updates); ``outside``: the ``OutsideTargets`` (row lists)."""
        if self.row_update is not None:
            return None
        if self.rows is None:
            return self.dense.to(self.dtype)
        indices, values = torch.cat([self.rows, outside.slot_rows]), self.values  # (K + B,), uncoalesced
        if not self.rows.numel():  # no row is touched anyway: drop the unused slots (a host sync; no mode gets here
            indices, values = indices[outside.used], values[outside.used]  # with owned targets in a steady step)
        return torch.sparse_coo_tensor(indices[None], values.to(self.dtype), self.shape, check_invariants=False)


class OutsideTargets:
    """The owned targets that are not among the rows, grouped into B fixed slots with no host sync.

    Batch rows with the same target share a slot; slot g < (number of distinct targets) holds
    the g-th smallest such row, the other slots hold ``anchor`` (a row of the column list) with
    ``used`` False, so every shape is B whatever the labels are. Sorting puts the entries of
    one target next to each other; a cumulative sum over "differs from the previous" numbers
    the slots.
    """

    def __init__(self, target_local, outside, anchor):
        batch = target_local.numel()
        key = torch.where(outside, target_local, torch.iinfo(torch.int64).max)  # (B,) the others sort last
        sorted_key, order = torch.sort(key)
        first = torch.ones_like(outside)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        slot_sorted = first.cumsum(0) - 1  # (B,) slot of each sorted entry
        self.slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # (B,) slot of each batch row
        self.used = torch.zeros_like(outside).scatter_(0, slot_sorted, outside[order])  # (B,) bool
        rows = torch.empty_like(target_local).scatter_(0, slot_sorted, sorted_key)  # entries of a slot agree
        self.slot_rows = torch.where(self.used, rows, anchor.expand(batch))  # (B,)
        self.batch = batch

    def sum(self, grad):
        """(B, D) per slot: the sum of ``grad``'s rows (B, D) over the batch rows in the slot."""
        return grad.new_zeros(self.batch, grad.shape[1]).index_put_((self.slot,), grad, accumulate=True)


def add_outside_target_grads(*, features, weight, rows, target_local, tpos, g_target, normalize, grad_f, grad_w):
    """Adds d target_i = <f_i, w_hat_y> for owned targets outside the columns to grad_f (B, D) and grad_w;
    returns their ``OutsideTargets``."""
    w_t, norm, owned = target_rows(weight, target_local, normalize, features.dtype)
    outside = owned & (tpos < 0)  # (B,)
    g = torch.where(outside, g_target, torch.zeros_like(g_target))[:, None]  # (B, 1)
    grad_f.add_(g * w_t)
    g_hat = normalize_backward_(g * features, w_t, norm)  # (B, D), zero where not outside
    # unused slots point at a row that is touched anyway; with no rows, row 0 (dropped again in finish)
    slots = OutsideTargets(target_local, outside, rows[:1] if rows.numel() else target_local.new_zeros(1))
    grad_w.add_outside_rows(slots, g_hat)
    return slots
