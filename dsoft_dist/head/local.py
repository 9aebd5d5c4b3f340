"""One class shard's part of the loss: per-row statistics over its (sampled) rows, chunked.

This is the seam the fused kernels plug into: ``torch_local_shard_stats`` (and any backend
registered with ``register_local_backend``, same signature) maps

    features (B, D)           the global batch, already L2-normalized when normalize=True
    weight   (C_local, D)     the shard's raw class rows (normalized here, row by row)
    rows     (K,) or None     sorted LOCAL ids of the shard's negatives (None = all rows)
    target_local (B,) int64   local row of each row's target if this shard owns it, else -1
    valid    (B,) bool        False for ignored rows (label -1)

to three per-row statistics (B,) each, with l_ik = scale * cos(f_i, w_k):

    lse      = log sum_{k in rows, k != target_i} exp(l_ik)     (-inf: no negatives here)
    target   = cos(f_i, w_{y_i}) if this shard owns y_i, else 0  (linear: the raw logit)
    max      = max_{k in rows, k != target_i} l_ik               (diagnostics, no gradient)

The torch path walks the rows in chunks of ``chunk_size`` so no (B, C_local) logit matrix
exists; backward recomputes each chunk's logits from the saved ``lse`` (or, within the
opt-in ``logit_cache_mb`` budget, rescales the forward's exp'd chunk) and uses the closed
forms of DESIGN.md §1: dlse/dl_ik = exp(l_ik - lse_i); d target / d(f, w_y) = (w_y, f);
both chained through the row normalization w/|w|. The weight gradient is dense when
rows is None and a sparse COO tensor over the touched rows (the negatives plus the owned
targets; uncoalesced, with fixed-size slots for the targets, so no size is read back to the
host) otherwise, so sampled steps cost O(K D), not O(C_local D).
With ``row_update`` (an optimizer fused into backward) no weight gradient is returned:
each chunk's rows are handed to it with their complete gradient instead.
"""
from __future__ import annotations

import math
import torch

from dsoft_dist.head.optim import product_gradient

_NORM_EPS = 1e-12  # the eps of F.normalize, so the references agree to rounding
# automatic chunk size, in logits per chunk (B * chunk): on CPU a chunk's logits should stay
# cache-resident across the epilogue's passes (mask, exp, sum): 1M fp32 = 4 MiB measured ~10%
# faster per step than 16M at B=512, C=262k, D=512; on GPU fewer, larger launches win.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
_MIN_CHUNK = 256  # keeps the GEMMs wide enough to run near the matmul rate
# Inside the chunk loops logits are kept in base-2 units, l * log2(e), so every exp is an
# exp2: torch 2.13's CPU exp2 runs ~4x faster than exp (0.11 vs 0.43 ms per 1M floats,
# measured); log2(e) is folded into the feature scale and the results are converted back.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# one shift per row serves every forward chunk when scale * log2(e) + log2(rows) <= this (_forward_chunks)
_FIXED_SHIFT_LIMIT = 114.0


def auto_chunk_size(batch_size: int, chunk_size: int = 0, device: torch.device | str | None = None) -> int:
    """Classes per chunk: ``chunk_size`` if > 0, else B * chunk ~ 1M logits on CPU, 16M on CUDA."""
    if chunk_size > 0:
        return chunk_size
    kind = torch.device(device).type if device is not None else "cpu"
    budget = _CHUNK_ELEMENTS.get(kind, _CHUNK_ELEMENTS["cuda"])
    return max(_MIN_CHUNK, budget // max(1, batch_size))


class _Workspace:
    """Chunk buffers reused by every chunk of one call: large fresh allocations page-fault on CPU.

    Logit chunks are laid out class-major, (k, B): the GEMMs W_c F^T and G_c F run ~8% faster
    on CPU than their batch-major transposes (measured at B = D = 512, k = 2048). The logit and
    block buffers hold one spare row after the chunk's k rows (see ``_TargetSlots``).
    """

    def __init__(self, batch, chunk, dim, dtype, device, gathered, grad_buffer=False, block_buffer=False):
        self.logits = torch.empty((chunk + 1) * batch, dtype=dtype, device=device)  # viewed (k + 1, B)
        self.block = torch.empty((chunk + 1) * batch, dtype=dtype, device=device) if block_buffer else None
        # gathered (sampled) rows are copied into a buffer (k, D); a slice of all rows is a view of the
        # weight. The chunk's gradient has a buffer unless it is written into a dense gradient.
        self.rows = torch.empty(chunk * dim, dtype=dtype, device=device) if gathered else None
        self.grad = torch.empty(chunk * dim, dtype=dtype, device=device) if grad_buffer else None
        self.batch, self.dim = batch, dim
        self._views = {}

    def logits_view(self, k):
        """(k + 1, B): the chunk's logits in the first k rows, then the spare row (views made once per k)."""
        return self._view("logits", self.logits, k)

    def block_view(self, k):
        return self._view("block", self.block, k)

    def _view(self, name, buf, k):
        view = self._views.get((name, k))
        if view is None:
            view = self._views[(name, k)] = buf[:(k + 1) * self.batch].view(k + 1, self.batch)
        return view

    def rows_view(self, k):
        return None if self.rows is None else self.rows[:k * self.dim].view(k, self.dim)

    def grad_view(self, k):
        return self.grad[:k * self.dim].view(k, self.dim)


class _TargetSlots:
    """Where each batch row's target sits in a chunk's (k + 1, B) buffer, for one scatter per chunk.

    Row i's slot is tpos_i - c0 when its target falls in the chunk, else the spare row k, so the
    forward's -inf mask and backward's target coefficient are one ``scatter_`` each, with no
    mask or gather (O(B) per chunk, no host sync).
    """

    def __init__(self, tpos, chunk):
        self.chunk_id = torch.where(tpos >= 0, tpos.div(chunk, rounding_mode="floor"), -1)  # (B,)
        self.offset = tpos - self.chunk_id * chunk  # (B,) row within the chunk (unused where chunk_id = -1)
        self._int32 = None

    def int32(self):
        """(chunk_id, offset) as contiguous int32 (B,) tensors, the form the CPU epilogues take."""
        if self._int32 is None:
            self._int32 = (self.chunk_id.to(torch.int32).contiguous(), self.offset.to(torch.int32).contiguous())
        return self._int32

    def index(self, j, k):
        """(1, B) slots in chunk j of k rows."""
        return torch.where(self.chunk_id == j, self.offset, k)[None, :]


def _rows_hat(weight, rows, normalize, dtype):
    """The rows ``weight[rows]`` (n, D), normalized when asked, and their norms (n,) (None when not normalizing)."""
    src = weight.index_select(0, rows).to(dtype)
    if not normalize:
        return src, None
    norm = torch.linalg.vector_norm(src, dim=1)  # (n,)
    return src / norm.clamp_min(_NORM_EPS)[:, None], norm


def _chunk_rows(weight, rows, c0, c1, dtype, out=None):
    """The chunk's raw rows (k, D) in ``dtype``: a view of the weight when possible, else gathered into ``out``."""
    if rows is None:
        return weight[c0:c1].to(dtype)
    if out is None or weight.dtype != dtype:
        return weight.index_select(0, rows[c0:c1]).to(dtype)
    return torch.index_select(weight, 0, rows[c0:c1], out=out)


def _inv_norm(norm, out=None):
    """1 / max(|w_k|, eps) (the shape of ``norm``, in ``out`` when given): the factor that turns raw-row
    logits into cosine logits."""
    return torch.clamp_min(norm, _NORM_EPS, out=out).reciprocal_()


def _normalize_backward_(grad_hat, w_hat, norm):
    """In place: the gradient through w_hat = w / max(|w|, eps), i.e. (g - w_hat <w_hat, g>) / |w| (g / eps below eps)."""
    if norm is None:
        return grad_hat
    radial = torch.einsum("kd,kd->k", w_hat, grad_hat)  # (k,) without a (k, D) temporary
    radial = torch.where(norm > _NORM_EPS, radial, torch.zeros_like(radial))
    grad_hat.addcmul_(w_hat, radial[:, None], value=-1.0)
    return grad_hat.div_(norm.clamp_min(_NORM_EPS)[:, None])


def _target_positions(rows, target_local):
    """(B,) position of each row's target in the column list (rows or all rows), -1 if absent."""
    if rows is None:
        return target_local
    if rows.numel() == 0:
        return torch.full_like(target_local, -1)
    pos = torch.searchsorted(rows, target_local.clamp(min=0)).clamp(max=rows.numel() - 1)  # (B,)
    hit = (target_local >= 0) & (rows[pos] == target_local)
    return torch.where(hit, pos, torch.full_like(pos, -1))


def _epilogues_for(features, epilogues):
    """The cpu-c backend's compiled epilogues when they apply (float32 CPU features), else None (torch ops)."""
    if epilogues is None or features.device.type != "cpu" or features.dtype != torch.float32:
        return None
    return epilogues


def _n_cols(weight, rows):
    return weight.shape[0] if rows is None else rows.numel()


def _n_chunks(n_cols, chunk):
    return -(-n_cols // chunk)


def _chunk_sources(weight, rows, chunk, dtype):
    """The chunks' raw rows as views made in one call when they are slices of the weight, else None."""
    return weight.split(chunk) if rows is None and weight.dtype == dtype else None


def _inv_norms(src, norm_out, inv_out):
    """Writes the rows' norms (k,) into ``norm_out`` and returns 1 / max(|w_k|, eps) (k, 1) in ``inv_out``."""
    torch.linalg.vector_norm(src, dim=1, out=norm_out)
    return _inv_norm(norm_out[:, None], out=inv_out)


def fixed_shift_ok(scale, n_cols, normalize):
    """True when one shift per row serves every forward chunk (cosine logits; see ``_forward_chunks``)."""
    return normalize and scale * _LOG2E + math.log2(max(n_cols, 2)) <= _FIXED_SHIFT_LIMIT


def _forward_chunks(f_s, weight, rows, tpos, normalize, chunk, n_cached=0, fixed_shift=False, epi=None):
    """Per-row log-sum-exp and max over the chunks; returns (lse (B,), max (B,), row norms, cache).

    ``f_s`` = features * scale * log2(e): the loop works in base 2 (exp2, log2); lse and max
    are returned in natural units, the cache's blocks and shifts stay in base 2.

    Without ``fixed_shift`` each chunk is shifted by the running max (online log-sum-exp: a
    pass to subtract it, and the running sum rescaled when the max grows). With it, one shift
    per row serves every chunk after the first and is subtracted in the same pass that scales
    by 1 / |w_k|. Cosine logits are bounded, |l_ik| <= b_i = |f_s_i| (base 2); with m_i the
    first chunk's max and n the rows, t_i = max(min(b_i, m_i + 64), b_i + log2 n - 126) keeps
    every term <= 2^126 / n (their sum cannot overflow) and the largest term >= 2^-64, or
    >= 2^(126 - 2 b_i - log2 n) >= 2^(log2 n - 102) when b + log2 n <= 114 (``fixed_shift_ok``):
    the terms fp32 loses below 2^-126 (n of them at most) stay under 2^-24 of the sum.

    The row norms (n_cols,) (None when not normalizing) are kept for backward. The first
    ``n_cached`` chunks keep exp(l - shift) (k, B) and their column shift (B,) in ``cache`` so
    backward can skip recomputing them (the logit cache, off by default). ``epi`` (the CPU
    epilogues, or None) does a fixed-shift chunk's passes in one.
    """
    batch, n_cols = f_s.shape[0], _n_cols(weight, rows)
    width = min(chunk, max(n_cols, 1))
    ws = _Workspace(batch, width, f_s.shape[1], f_s.dtype, f_s.device, rows is not None)
    inv_buf = f_s.new_empty(width, 1) if normalize else None
    slots = _TargetSlots(tpos, chunk)
    sources = _chunk_sources(weight, rows, chunk, f_s.dtype)
    norms = f_s.new_empty(n_cols) if normalize else None
    norm_chunks = norms.split(chunk) if normalize else None
    run_max = f_s.new_full((batch,), float("-inf"))  # (B,) relative to the fixed shift once that is set
    run_sum = f_s.new_zeros(batch)  # (B,)
    shift = f_s.new_zeros(batch)  # (B,) the shift of run_sum (finite)
    f_t, neg_shift, cache = f_s.t(), None, []
    for j in range(_n_chunks(n_cols, chunk)):
        c0 = j * chunk
        k = min(chunk, n_cols - c0)
        src = sources[j] if sources is not None else _chunk_rows(weight, rows, c0, c0 + k, f_s.dtype, ws.rows_view(k))
        padded = ws.logits_view(k) if j >= n_cached else f_s.new_empty(k + 1, batch)  # (k + 1, B)
        logits = torch.mm(src, f_t, out=padded[:k])  # (k, B)
        inv = _inv_norms(src, norm_chunks[j], inv_buf[:k] if k < width else inv_buf) if normalize else None
        if neg_shift is not None and epi is not None and j >= n_cached:  # one fused pass
            epi.forward_fixed(logits, inv, neg_shift, slots.int32(), j, run_max, run_sum)
        elif neg_shift is not None:  # l - t in one pass
            torch.addcmul(neg_shift, logits, inv, out=logits)
            padded.scatter_(0, slots.index(j, k), float("-inf"))  # the targets are not negatives
            torch.maximum(run_max, logits.amax(dim=0), out=run_max)
            run_sum.add_(logits.exp2_().sum(dim=0))
        else:
            if inv is not None:
                logits.mul_(inv)
            padded.scatter_(0, slots.index(j, k), float("-inf"))
            new_max = torch.maximum(run_max, logits.amax(dim=0))  # (B,)
            new_shift = torch.nan_to_num(new_max, nan=0.0, posinf=0.0, neginf=0.0)  # -inf: no negative seen yet
            run_sum = run_sum * torch.exp2(run_max - new_shift) + logits.sub_(new_shift).exp2_().sum(dim=0)
            run_max, shift = new_max, new_shift
        if j < n_cached:
            cache.append((padded, shift))
        if fixed_shift and j == 0:  # t from the first chunk's max; run_sum and run_max move to it
            bound = torch.linalg.vector_norm(f_s, dim=1)  # (B,)
            t = torch.maximum(torch.minimum(bound, run_max + 64.0), bound + (math.log2(max(n_cols, 2)) - 126.0))
            run_sum.mul_(torch.exp2(shift - t))
            run_max, shift, neg_shift = run_max - t, t, -t[None, :]
    if neg_shift is not None:
        run_max = run_max + shift
    return (shift + torch.log2(run_sum)) * _LN2, run_max * _LN2, norms, cache


def _target_rows(weight, target_local, normalize, dtype):
    """Each row's (normalized) target row (B, D), norms (B,), and the owned mask (B,)."""
    owned = target_local >= 0
    idx = target_local.clamp(min=0)
    w_t, norm = _rows_hat(weight, idx, normalize, dtype)
    return w_t, norm, owned


class LocalShardStats(torch.autograd.Function):
    """(features, weight, rows, target_local, valid) -> (lse, target, max) with chunked recompute backward."""

    @staticmethod
    def forward(ctx, features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached, row_update,
                epilogues):
        tpos = _target_positions(rows, target_local)  # (B,)
        f_s2 = features * (scale * _LOG2E)  # (B, D): base-2 logits
        fixed = fixed_shift_ok(scale, _n_cols(weight, rows), normalize)
        lse, run_max, norms, ctx.cache = _forward_chunks(f_s2, weight, rows, tpos, normalize, chunk, n_cached, fixed,
                                                          _epilogues_for(features, epilogues))
        neg_inf = torch.full_like(lse, float("-inf"))
        lse, run_max = torch.where(valid, lse, neg_inf), torch.where(valid, run_max, neg_inf)
        w_t, _, owned = _target_rows(weight, target_local, normalize, features.dtype)
        target = torch.where(owned, (features * w_t).sum(dim=1), torch.zeros_like(lse))  # (B,)
        ctx.save_for_backward(features, weight, rows, target_local, tpos, lse, norms)
        ctx.scale, ctx.normalize, ctx.chunk, ctx.n_cached = scale, normalize, chunk, len(ctx.cache)
        ctx.row_update, ctx.epilogues = row_update, _epilogues_for(features, epilogues)
        ctx.mark_non_differentiable(run_max)
        return lse, target, run_max

    @staticmethod
    def backward(ctx, g_lse, g_target, _g_max):
        features, weight, rows, target_local, tpos, lse, norms = ctx.saved_tensors
        if ctx.n_cached and ctx.cache is None:
            raise RuntimeError("backward ran twice through the head with logit_cache_mb > 0 (the cache is consumed "
                               "by the first backward); use logit_cache_mb=0 with retain_graph=True")
        grad_w = _WeightGrad(weight, rows, target_local, tpos, features.dtype, ctx.row_update)
        grad_f = _backward_chunks(features, weight, rows, tpos, g_lse, g_target, lse, norms, grad_w, ctx)
        outside = None
        if rows is not None:  # owned targets outside the columns: their gradient is not in any chunk
            outside = _add_outside_target_grads(features, weight, rows, target_local, tpos, g_target,
                                                     ctx.normalize, grad_f, grad_w)
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.cache = None
        return (grad_f if need_f else None), (grad_w.finish(outside) if need_w else None), *([None] * 9)


class _WeightGrad:
    """Collects the weight gradient: dense (C_local, D), values over the touched rows only, or
    row updates handed to ``row_update`` (an optimizer fused into backward: no gradient is kept).

    Each row's gradient is complete when its chunk is done: the chunk's GEMM includes the
    targets inside it, and owned targets outside every chunk get their own rows. With a row
    list the values are (K + B, D): the K rows in order (each chunk writes its slice in place),
    then one slot per batch row for the owned targets outside the rows (``_OutsideTargets``),
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

        A fused optimizer that takes the product form (``row_update.product``) applies it
        itself; otherwise the gradient is formed in the chunk's output and committed.
        """
        product = getattr(self.row_update, "product", None)
        chunk_rows = None if self.rows is None else self.rows[c0:c0 + lhs.shape[0]]
        if product is not None:
            product(lhs, rhs, row_coef, values, rows=chunk_rows, start=c0, out=ws.grad_view(lhs.shape[0]))
            return
        self.commit_chunk(c0, product_gradient(lhs, rhs, row_coef, values, self.chunk_out(c0, lhs.shape[0], ws)))

    def commit_chunk(self, c0, grad):
        """The chunk's rows (distinct, not yet written) get their whole gradient ``grad`` (k, D), which was
        computed in ``chunk_out`` (the dense gradient or the values: nothing left to do)."""
        if self.row_update is not None:
            self.row_update(grad, rows=None if self.rows is None else self.rows[c0:c0 + grad.shape[0]], start=c0)

    def add_outside_rows(self, outside: "_OutsideTargets", grad):
        """Owned targets outside the columns: ``grad`` (B, D) holds each batch row's gradient for its target
        (zero for the other rows); each distinct target row gets the sum of its entries."""
        summed = outside.sum(grad)  # (B, D) one slot per distinct outside target, the rest zero
        if self.row_update is not None:  # one update per distinct row; unused slots are left unchanged
            self.row_update(summed, rows=outside.slot_rows, mask=outside.used)
        else:
            self.values[self.rows.numel():] = summed

    def finish(self, outside=None):
        """The weight gradient (None with row updates); ``outside``: the ``_OutsideTargets`` (row lists)."""
        if self.row_update is not None:
            return None
        if self.rows is None:
            return self.dense.to(self.dtype)
        indices, values = torch.cat([self.rows, outside.slot_rows]), self.values  # (K + B,), uncoalesced
        if not self.rows.numel():  # no row is touched anyway: drop the unused slots (a host sync; no mode gets here
            indices, values = indices[outside.used], values[outside.used]  # with owned targets in a steady step)
        return torch.sparse_coo_tensor(indices[None], values.to(self.dtype), self.shape, check_invariants=False)


class _OutsideTargets:
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


def _backward_chunks(features, weight, rows, tpos, g_lse, g_target, lse, norms, grad_w, ctx):
    """Recomputes each chunk, fills grad_w and returns d loss / d features (B, D).

    The (k, B) block holds |dL/dl_ik| = |g_i| exp(l_ik - lse_i), formed in one exp as
    exp(l_ik - lse_i + log|g_i|); the sign of g_i (+-1) is applied to the small (B, D)
    operands instead. A target inside the chunk is masked in the logits, so its entry is 0;
    it is set to g_target_i / (s sign_i), which makes the same two GEMMs add the target's
    gradient <f_i, w_hat_y> too. With normalized rows, l_ik = s <f_i, w_k> / |w_k|: the block is
    scaled by 1 / |w_k| and multiplies the raw rows, so no normalized copy of the rows is made;
    the radial part of the normalization's backward, <w_hat_k, dL/dw_hat_k> w_hat_k / |w_k|, is
    subtracted per row. With the CPU epilogues (float32 on CPU, normalized rows) a recomputed
    chunk's block, its target coefficients, 1 / |w_k| and the radial sum are one pass over the
    logits (``_chunk_grads`` does the same with torch ops).
    """
    batch, n_cols = features.shape[0], _n_cols(weight, rows)
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.full_like(lse, float("inf"))) - torch.log(g_lse.abs())  # (B,)
    shift2 = shift * _LOG2E  # base 2, like the logits below
    sign = torch.where(g_lse < 0, -1.0, 1.0).to(features.dtype)  # (B,) never 0: the target coefficient divides by it
    target_coef = g_target / (ctx.scale * sign)  # (B,)
    f_s2 = features * (ctx.scale * _LOG2E)  # (B, D): base-2 logits
    f_signed = features * (ctx.scale * sign[:, None])
    grad_f = torch.zeros_like(features)  # (B, D): sum_k |G_ik| w_hat_k, signed and scaled at the end
    epi = ctx.epilogues if ctx.normalize else None  # they write the block over the logits
    width = min(ctx.chunk, max(n_cols, 1))
    ws = _Workspace(batch, width, features.shape[1], features.dtype, features.device, rows is not None,
                    grad_buffer=grad_w.dense is None, block_buffer=epi is None)
    slots = _TargetSlots(tpos, ctx.chunk)
    sources = _chunk_sources(weight, rows, ctx.chunk, features.dtype)
    neg_shift2, coef_row = -shift2[None, :], target_coef[None, :]  # (1, B) each
    if ctx.normalize:
        inv_all = _inv_norm(norms)  # (n_cols,)
        # 1 / |w_k|^2, and 0 below eps (those rows get no radial term), for the radial coefficient
        inv_sq = torch.where(norms > _NORM_EPS, inv_all.square(), 0.0).split(ctx.chunk)
        inv_cols = inv_all[:, None].split(ctx.chunk)  # (k, 1) views
    sign_ln2 = sign * -_LN2  # (B,): the radial sum in natural units, negated
    f_t = f_s2.t()
    radial_buf = features.new_empty(width) if epi is not None else None  # (k,)
    for j in range(_n_chunks(n_cols, ctx.chunk)):
        c0 = j * ctx.chunk
        k = min(ctx.chunk, n_cols - c0)
        src = sources[j] if sources is not None else _chunk_rows(weight, rows, c0, c0 + k, features.dtype,
                                                                  ws.rows_view(k))  # (k, D) raw rows
        inv = inv_cols[j] if ctx.normalize else None  # (k, 1)
        logits = None
        if j < ctx.n_cached:  # exp(l - s_c) * exp(s_c - lse + log|g|), in place on the cached chunk
            padded, chunk_shift = ctx.cache[j]
            block = padded[:k].mul_(torch.exp2(chunk_shift - shift2))
        else:  # the target entries are not masked: the target coefficient replaces them below
            logits = torch.mm(src, f_t, out=ws.logits_view(k)[:k])  # (k, B) <f_s2_i, w_k>, raw rows
            if epi is not None:  # the block's passes in one, in place over the logits
                epi.backward_block(logits, inv, inv_sq[j], neg_shift2, slots.int32(), j, target_coef, sign_ln2,
                                   radial_buf[:k])
                grad_f.addmm_(logits.t(), src)
                grad_w.commit_product(c0, logits, f_signed, radial_buf[:k], src, ws)
                continue
            padded = ws.block_view(k)
            block = padded[:k]  # (k, B) |dL/dl|
            if inv is not None:  # l * log2(e) - shift = logits / |w_k| - shift, in one pass
                torch.addcmul(neg_shift2, logits, inv, out=block)
            else:
                torch.sub(logits, shift2, out=block)
            block.exp2_()
        padded.scatter_(0, slots.index(j, k), coef_row)
        _chunk_grads(block, src, inv, inv_sq[j] if ctx.normalize else None, f_signed, grad_f, grad_w, c0, ws,
                     logits, sign_ln2)
    return grad_f.mul_(sign[:, None]).mul_(ctx.scale)


def _chunk_grads(block, src, inv, inv_sq, f_signed, grad_f, grad_w, c0, ws, logits=None, sign_ln2=None):
    """Adds the chunk's block (k, B) @ rows to grad_f and gives the rows' gradient to ``grad_w``.

    inv, inv_sq: the rows' 1 / max(|w_k|, eps) (k, 1) and 1 / |w_k|^2 (0 below eps) (k,), or None for
    raw (unnormalized) rows. The rows' gradient is block @ f_signed minus the radial part of the
    normalization's backward, <w_hat_k, dL/dw_hat_k> w_k / |w_k|^2, a multiple of each raw row:
    it is handed over in that form (``_WeightGrad.commit_product``), so a fused SGD can run the
    GEMM straight into its momentum. <w_hat_k, dL/dw_hat_k> = sum_i sign_i |dL/dl_ik| l_ik comes
    from the block and the chunk's unmasked raw-row base-2 ``logits`` <f_s2_i, w_k> (k, B) when
    given (they are overwritten; ``sign_ln2`` = -ln2 sign), else (cached chunks) from the rows
    and their gradient.
    """
    if inv is None:
        grad_f.addmm_(block.t(), src)
        grad_w.commit_product(c0, block, f_signed, None, src, ws)
        return
    block.mul_(inv)  # |dL/dl| / |w_k|: the block now multiplies raw rows
    grad_f.addmm_(block.t(), src)
    if logits is None:
        g_w = torch.mm(block, f_signed, out=grad_w.chunk_out(c0, block.shape[0], ws))  # (k, D)
        radial = torch.linalg.vecdot(src, g_w, dim=1).mul_(inv_sq)  # (k,)
        grad_w.commit_chunk(c0, g_w.addcmul_(src, radial[:, None], value=-1.0))
        return
    # l log2(e) = logits / |w_k|, so sum_i sign_i block_ik l_ik = (sum_i sign_i block_ik logits_ik) ln2 / |w_k|
    minus_radial = torch.mv(logits.mul_(block), sign_ln2).mul_(inv_sq)  # (k,)
    grad_w.commit_product(c0, block, f_signed, minus_radial, src, ws)


def _add_outside_target_grads(features, weight, rows, target_local, tpos, g_target, normalize, grad_f, grad_w):
    """Adds d target_i = <f_i, w_hat_y> for owned targets outside the columns to grad_f (B, D) and grad_w;
    returns their ``_OutsideTargets``."""
    w_t, norm, owned = _target_rows(weight, target_local, normalize, features.dtype)
    outside = owned & (tpos < 0)  # (B,)
    g = torch.where(outside, g_target, torch.zeros_like(g_target))[:, None]  # (B, 1)
    grad_f.add_(g * w_t)
    g_hat = _normalize_backward_(g * features, w_t, norm)  # (B, D), zero where not outside
    # unused slots point at a row that is touched anyway; with no rows, row 0 (dropped again in finish)
    slots = _OutsideTargets(target_local, outside, rows[:1] if rows.numel() else target_local.new_zeros(1))
    grad_w.add_outside_rows(slots, g_hat)
    return slots


def torch_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, chunk_size=0,
                            logit_cache_mb=0.0, row_update=None, compute_dtype=None, epilogues=None):
    """The torch (reference, CPU) backend of the local shard statistics; see the module docstring.

    logit_cache_mb > 0 keeps up to that many MiB of the forward's exp'd logit chunks for
    backward, which then skips their recompute (one GEMM of 2 B k D per cached chunk).
    row_update(grad (n, D), rows=None | (n,) local ids, start=0, mask=None), when given, receives
    each row's whole gradient in backward (rows [start, start + n) when rows is None; only the
    rows where ``mask`` is True, when given, the others repeat and stay unchanged) instead of a
    weight gradient: an optimizer fused into backward (``ShardedClassifier.fuse_optimizer``).
    If it has a ``product(lhs, rhs, row_coef, values, rows=None, start=0, out=None)`` method
    (``dsoft_dist.head.optim.FusedRowUpdate``), chunks hand their gradient over in product form,
    lhs @ rhs + row_coef[:, None] * values, instead. ``compute_dtype`` is accepted for the
    shared signature and unused: this path computes in fp32 (float64 for float64 features),
    reading 16-bit weight rows chunk by chunk; gradients come back in the inputs' dtypes.
    ``epilogues``: the cpu-c backend's compiled passes (``dsoft_dist.kernels.cpu``), used for
    float32 CPU features; None runs every pass as torch ops (the reference).
    """
    if features.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32; the gradient casts back
        features = features.float()
    chunk = auto_chunk_size(features.shape[0], chunk_size, features.device)
    chunk_bytes = features.shape[0] * chunk * features.element_size()
    n_cached = int(logit_cache_mb * (1 << 20) // max(chunk_bytes, 1)) if torch.is_grad_enabled() else 0
    return LocalShardStats.apply(features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached,
                                 row_update, epilogues)
