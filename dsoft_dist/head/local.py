"""One class shard's part of the loss: per-row statistics over its (sampled) rows, chunked (the torch backend).

``torch_local_shard_stats`` (and every backend of ``dsoft_dist.head.backend``, same signature) maps

    features (B, D)           the global batch, already L2-normalized when normalize=True
    weight   (C_local, D)     the shard's raw class rows (normalized here, row by row)
    rows     (K,) or None     sorted LOCAL ids of the shard's negatives (None = all rows)
    target_local (B,) int64   local row of each row's target if this shard owns it, else -1
    valid    (B,) bool        False for ignored rows (label -1)

to three per-row statistics (B,) each, with l_ik = scale * cos(f_i, w_k):

    lse      = log sum_{k in rows, k != target_i} exp(l_ik)     (-inf: no negatives here)
    target   = cos(f_i, w_{y_i}) if this shard owns y_i, else 0  (linear: the raw logit)
    max      = max_{k in rows, k != target_i} l_ik               (diagnostics, no gradient)

The loops walk the columns in chunks (``dsoft_dist.head.chunks``), so no (B, C_local) logit
matrix exists. Forward keeps a running max and a running sum of exp(l - max) per row (online
log-sum-exp). Backward recomputes each chunk's logits from the saved ``lse`` (or, within the
opt-in ``logit_cache_mb`` budget, rescales the forward's exp'd chunk) and uses the closed
forms of DESIGN.md §1: dlse/dl_ik = exp(l_ik - lse_i); d target / d(f, w_y) = (w_y, f); both
chained through the row normalization w/|w|. The weight gradient is dense when rows is None
and a sparse COO tensor over the touched rows otherwise (``dsoft_dist.head.weight_grad``), so
sampled steps cost O(K D), not O(C_local D). With ``row_update`` (the step in backward) no
weight gradient is returned: each chunk's rows are handed to it with their complete gradient.

The passes between a chunk's GEMMs are a ``Passes`` object: ``TorchPasses`` here (torch ops,
natural units), or the cpu-c backend's compiled ones (``dsoft_dist.head.cpu_c``).
"""
from __future__ import annotations

import torch

from dsoft_dist.head.chunks import (
    NORM_EPS,
    ChunkPlan,
    TargetSlots,
    Workspace,
    auto_chunk_size,
    inv_norm,
    inv_norms_into,
    target_positions,
    target_rows,
)
from dsoft_dist.head.weight_grad import WeightGrad, add_outside_target_grads

__all__ = ["LocalShardStats", "TorchPasses", "auto_chunk_size", "torch_local_shard_stats"]


class TorchPasses:
    """A chunk's passes as torch ops, in natural units: each chunk is shifted by the running max.

    ``unit`` scales the logits the GEMMs produce (1 here: l itself) and ``exp`` / ``exp_`` undo
    it; the cpu-c backend's passes (``dsoft_dist.head.cpu_c.CpuCPasses``) work in base 2
    (``unit`` = log2 e, ``exp`` = exp2) and reuse this online step for their first chunk.
    """

    unit = 1.0
    exp = staticmethod(torch.exp)
    exp_ = staticmethod(torch.Tensor.exp_)

    def start(self, f_scaled, n_cols):
        """Before the first chunk: f_scaled (B, D) = features * scale * unit; n_cols columns in all."""
        batch = f_scaled.shape[0]
        self.run_max = f_scaled.new_full((batch,), float("-inf"))  # (B,)
        self.run_sum = f_scaled.new_zeros(batch)  # (B,) sum of exp(l - shift)
        self.shift = f_scaled.new_zeros(batch)  # (B,) finite

    def forward_chunk(self, j, logits, inv, padded, slots, cached):
        """Folds chunk j's logits (k, B) (raw-row products, in ``padded``'s first k rows) into the running
        max and sum; returns the shift (B,) its exp'd entries are relative to (kept for a cached chunk)."""
        k = logits.shape[0]
        if inv is not None:
            logits.mul_(inv)  # cosine logits
        padded.scatter_(0, slots.index(j, k), float("-inf"))  # the targets are not negatives
        new_max = torch.maximum(self.run_max, logits.amax(dim=0))  # (B,)
        new_shift = torch.nan_to_num(new_max, nan=0.0, posinf=0.0, neginf=0.0)  # -inf: no negative seen yet
        self.run_sum = self.run_sum * self.exp(self.run_max - new_shift) + self.exp_(logits.sub_(new_shift)).sum(dim=0)
        self.run_max, self.shift = new_max, new_shift
        return new_shift

    def finish(self):
        """(lse (B,), max (B,)) in natural units."""
        return self.shift + torch.log(self.run_sum), self.run_max

    def begin_backward(self, bc, width):
        """Before backward's first chunk (``bc``: the ``_BackwardContext``; width: the widest chunk)."""

    def backward_block(self, j, logits, inv, inv_sq, bc):
        """Chunk j's block (k, B), written over its recomputed logits (raw-row products): |dL/dl| / |w_k| with
        the target coefficients (|dL/dl| without normalization), and minus its radial coefficient (k,), or
        None when the caller takes the radial part from the rows' gradient (``_commit_rows``), as here."""
        k = logits.shape[0]
        if inv is not None:
            torch.addcmul(bc.neg_shift, logits, inv, out=logits)  # l - shift in one pass
        else:
            logits.add_(bc.neg_shift)
        block = self.exp_(logits)  # |dL/dl| = exp(l - lse + log|g|)
        bc.ws.logits_view(k).scatter_(0, bc.slots.index(j, k), bc.coef_row)
        return (block.mul_(inv) if inv is not None else block), None  # with 1/|w_k| the block multiplies raw rows


class LocalShardStats(torch.autograd.Function):
    """(features, weight, rows, target_local, valid) -> (lse, target, max) with chunked recompute backward.

    ``apply(features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached, row_update,
    passes)``: ``n_cached`` chunks keep their exp'd logits for backward, ``row_update`` is the step in
    backward (or None), ``passes`` a ``TorchPasses`` (or the cpu-c backend's) for this call.
    """

    @staticmethod
    def forward(ctx, features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached, row_update,
                passes=None):
        passes = passes if passes is not None else TorchPasses()
        plan = ChunkPlan(weight, rows, chunk, features.dtype)
        tpos = target_positions(rows, target_local)  # (B,)
        lse, run_max, norms, ctx.cache = _forward_chunks(features * (scale * passes.unit), plan=plan, tpos=tpos,
                                                         normalize=normalize, n_cached=n_cached, passes=passes)
        neg_inf = torch.full_like(lse, float("-inf"))
        lse, run_max = torch.where(valid, lse, neg_inf), torch.where(valid, run_max, neg_inf)
        w_t, _, owned = target_rows(weight, target_local, normalize, features.dtype)
        target = torch.where(owned, (features * w_t).sum(dim=1), torch.zeros_like(lse))  # (B,)
        ctx.save_for_backward(features, weight, rows, target_local, tpos, lse, norms)
        ctx.scale, ctx.normalize, ctx.chunk, ctx.n_cached = scale, normalize, chunk, len(ctx.cache)
        ctx.row_update, ctx.passes = row_update, passes
        ctx.mark_non_differentiable(run_max)
        return lse, target, run_max

    @staticmethod
    def backward(ctx, g_lse, g_target, _g_max):
        features, weight, rows, target_local, tpos, lse, norms = ctx.saved_tensors
        if ctx.n_cached and ctx.cache is None:
            raise RuntimeError("backward ran twice through the head with logit_cache_mb > 0 (the cache is consumed "
                               "by the first backward); use logit_cache_mb=0 with retain_graph=True")
        grad_w = WeightGrad(weight, rows, target_local, tpos, features.dtype, ctx.row_update)
        plan = ChunkPlan(weight, rows, ctx.chunk, features.dtype)
        grad_f = _backward_chunks(features, plan=plan, tpos=tpos, g_lse=g_lse, g_target=g_target, lse=lse,
                                  norms=norms, grad_w=grad_w, ctx=ctx)
        outside = None
        if rows is not None:  # owned targets outside the columns: their gradient is not in any chunk
            outside = add_outside_target_grads(features=features, weight=weight, rows=rows, target_local=target_local,
                                               tpos=tpos, g_target=g_target, normalize=ctx.normalize, grad_f=grad_f,
                                               grad_w=grad_w)
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.cache = None
        return (grad_f if need_f else None), (grad_w.finish(outside) if need_w else None), *([None] * 9)


def _forward_chunks(f_scaled, *, plan, tpos, normalize, n_cached, passes):
    """Runs every chunk through ``passes``; returns (lse (B,), max (B,), row norms (n_cols,) or None, cache).

    The row norms are kept for backward. The first ``n_cached`` chunks keep their exp'd
    logits (k + 1, B) and the shift (B,) they are relative to in ``cache`` (the logit cache).
    """
    batch = f_scaled.shape[0]
    ws = Workspace(plan, batch, f_scaled.shape[1], f_scaled.device)
    slots = TargetSlots(tpos, plan.chunk)
    norms = f_scaled.new_empty(plan.n_cols) if normalize else None
    norm_chunks = norms.split(plan.chunk) if normalize else None
    inv_buf = f_scaled.new_empty(plan.width, 1) if normalize else None
    f_t, cache = f_scaled.t(), []
    passes.start(f_scaled, plan.n_cols)
    for j in range(plan.n_chunks):
        _, k = plan.bounds(j)
        src = plan.source(j, ws)  # (k, D) raw rows
        padded = ws.logits_view(k) if j >= n_cached else f_scaled.new_empty(k + 1, batch)  # (k + 1, B)
        logits = torch.mm(src, f_t, out=padded[:k])  # (k, B)
        inv = inv_norms_into(src, norm_chunks[j], inv_buf[:k]) if normalize else None  # (k, 1)
        shift = passes.forward_chunk(j, logits, inv, padded, slots, cached=j < n_cached)
        if j < n_cached:
            cache.append((padded, shift))
    lse, run_max = passes.finish()
    return lse, run_max, norms, cache


class _BackwardContext:
    """What every chunk of one backward shares (B,) / (1, B): the shift, signs, target coefficients, buffers."""

    def __init__(self, features, lse, g_lse, g_target, scale, unit, ws, slots):
        finite = torch.isfinite(lse)
        shift = torch.where(finite, lse, torch.full_like(lse, float("inf"))) - torch.log(g_lse.abs())  # (B,)
        self.shift_u = shift * unit  # in the passes' units, like the recomputed logits
        self.neg_shift = -self.shift_u[None, :]  # (1, B)
        self.sign = torch.where(g_lse < 0, -1.0, 1.0).to(features.dtype)  # (B,) never 0: the coefficient divides by it
        self.target_coef = g_target / (scale * self.sign)  # (B,)
        self.coef_row = self.target_coef[None, :]  # (1, B)
        self.f_signed = features * (scale * self.sign[:, None])  # (B, D)
        self.ws, self.slots = ws, slots


def _backward_chunks(features, *, plan, tpos, g_lse, g_target, lse, norms, grad_w, ctx):
    """Recomputes each chunk, fills grad_w and returns d loss / d features (B, D).

    The (k, B) block holds |dL/dl_ik| = |g_i| exp(l_ik - lse_i), formed in one exp as
    exp(l_ik - lse_i + log|g_i|); the sign of g_i (+-1) is applied to the small (B, D)
    operands instead. A target inside the chunk is masked in the logits, so its entry is 0;
    it is set to g_target_i / (s sign_i), which makes the same two GEMMs add the target's
    gradient <f_i, w_hat_y> too. With normalized rows, l_ik = s <f_i, w_k> / |w_k|: the block is
    scaled by 1 / |w_k| and multiplies the raw rows, so no normalized copy of the rows is made;
    the radial part of the normalization's backward, <w_hat_k, dL/dw_hat_k> w_hat_k / |w_k|, is
    subtracted per row: from the chunk's row gradient (``_commit_rows``), or in product form
    when the passes give its coefficient (``WeightGrad.commit_product``).
    """
    passes = ctx.passes
    ws = Workspace(plan, features.shape[0], features.shape[1], features.device, grad_buffer=grad_w.dense is None)
    bc = _BackwardContext(features, lse, g_lse, g_target, ctx.scale, passes.unit, ws, TargetSlots(tpos, plan.chunk))
    passes.begin_backward(bc, plan.width)
    inv_cols = inv_sq = None
    if ctx.normalize:
        inv_all = inv_norm(norms)  # (n_cols,)
        # 1 / |w_k|^2, and 0 below eps (those rows get no radial term), for the radial coefficient
        inv_sq = torch.where(norms > NORM_EPS, inv_all.square(), 0.0).split(plan.chunk)
        inv_cols = inv_all[:, None].split(plan.chunk)  # (k, 1) views
    f_t = (features * (ctx.scale * passes.unit)).t()  # (D, B)
    grad_f = torch.zeros_like(features)  # (B, D): sum_k |G_ik| w_hat_k, signed and scaled at the end
    for j in range(plan.n_chunks):
        c0, k = plan.bounds(j)
        src = plan.source(j, bc.ws)  # (k, D) raw rows
        inv = inv_cols[j] if inv_cols is not None else None  # (k, 1)
        if j < ctx.n_cached:
            _cached_chunk_grads(j, src, inv, inv_sq, bc=bc, ctx=ctx, grad_f=grad_f, grad_w=grad_w, c0=c0)
            continue
        logits = torch.mm(src, f_t, out=bc.ws.logits_view(k)[:k])  # (k, B) raw-row products, targets unmasked
        block, minus_radial = passes.backward_block(j, logits, inv, inv_sq[j] if inv_sq is not None else None, bc)
        grad_f.addmm_(block.t(), src)
        _commit_rows(c0, block, src, inv_sq[j] if inv_sq is not None else None, minus_radial, bc=bc, grad_w=grad_w)
    return grad_f.mul_(bc.sign[:, None]).mul_(ctx.scale)


def _cached_chunk_grads(j, src, inv, inv_sq, *, bc, ctx, grad_f, grad_w, c0):
    """A cached chunk: exp(l - s_c) * exp(s_c - lse + log|g|) in place, then its gradients from the rows."""
    padded, chunk_shift = ctx.cache[j]
    k = src.shape[0]
    block = padded[:k].mul_(ctx.passes.exp(chunk_shift - bc.shift_u))
    padded.scatter_(0, bc.slots.index(j, k), bc.coef_row)
    if inv is not None:
        block.mul_(inv)  # the block now multiplies raw rows
    grad_f.addmm_(block.t(), src)
    _commit_rows(c0, block, src, inv_sq[j] if inv is not None else None, None, bc=bc, grad_w=grad_w)


def _commit_rows(c0, block, src, inv_sq, minus_radial, *, bc, grad_w):
    """Commits the gradient of the chunk's raw rows src (k, D) from its block (k, B), which multiplies raw rows.

    With normalized rows (``inv_sq``: 1 / |w_k|^2) and no radial coefficient from the passes, it is
    g = block @ f_signed less its radial part <w_k, g_k> w_k / |w_k|^2 (the normalization's backward);
    otherwise the product block @ f_signed + minus_radial w_k goes to ``WeightGrad.commit_product``.
    """
    if inv_sq is None or minus_radial is not None:
        grad_w.commit_product(c0, block, bc.f_signed, minus_radial, src, bc.ws)
        return
    g_w = torch.mm(block, bc.f_signed, out=grad_w.chunk_out(c0, block.shape[0], bc.ws))  # (k, D)
    radial = torch.linalg.vecdot(src, g_w, dim=1).mul_(inv_sq)  # (k,)
    grad_w.commit_chunk(c0, g_w.addcmul_(src, radial[:, None], value=-1.0), src)


def torch_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, *, chunk_size=0,
                            logit_cache_mb=0.0, row_update=None, compute_dtype=None, passes=None):
    """The torch backend (the reference) of the local shard statistics; see the module docstring.

    logit_cache_mb > 0 keeps up to that many MiB of the forward's exp'd logit chunks for
    backward, which then skips their recompute (one GEMM of 2 B k D per cached chunk).
    row_update(grad (n, D), rows=None | (n,) local ids, start=0, mask=None, values=None), when
    given, receives each row's whole gradient in backward (rows [start, start + n) when rows is
    None; only the rows where ``mask`` is True, when given, the others repeat and stay unchanged;
    ``values``, when given, is a gathered copy of those rows it may work in) instead of a weight
    gradient: the step in backward (``ShardedClassifier.step_in_backward``).
    If it has a ``product(lhs, rhs, row_coef, values, rows=None, start=0, out=None)`` method
    (``dsoft_dist.head.optim.InBackwardStep``), chunks whose passes give the radial coefficient
    before the GEMM (the cpu-c backend's; unnormalized rows) hand their gradient over in product
    form, lhs @ rhs + row_coef[:, None] * values, instead. ``compute_dtype`` is accepted for the
    shared signature and unused: this path computes in fp32 (float64 for float64 features),
    reading 16-bit weight rows chunk by chunk; gradients come back in the inputs' dtypes.
    ``passes``: the chunk passes (default ``TorchPasses()``; the cpu-c backend passes its own).
    """
    if features.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32; the gradient casts back
        features = features.float()
    chunk = auto_chunk_size(features.shape[0], chunk_size, features.device)
    chunk_bytes = features.shape[0] * chunk * features.element_size()
    n_cached = int(logit_cache_mb * (1 << 20) // max(chunk_bytes, 1)) if torch.is_grad_enabled() else 0
    return LocalShardStats.apply(features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached,
                                 row_update, passes if passes is not None else TorchPasses())
