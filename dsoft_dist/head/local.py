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
targets, unique by construction) otherwise, so sampled steps cost O(K D), not O(C_local D).
"""
from __future__ import annotations

from typing import Callable

import torch

_NORM_EPS = 1e-12  # the eps of F.normalize, so the references agree to rounding
# automatic chunk size, in logits per chunk (B * chunk): on CPU a chunk's logits should stay
# cache-resident across the epilogue's passes (mask, exp, sum): 1M fp32 = 4 MiB measured ~10%
# faster per step than 16M at B=512, C=262k, D=512; on GPU fewer, larger launches win.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
_MIN_CHUNK = 256  # keeps the GEMMs wide enough to run near the matmul rate


def auto_chunk_size(batch_size: int, chunk_size: int = 0, device: torch.device | str | None = None) -> int:
    """Classes per chunk: ``chunk_size`` if > 0, else B * chunk ~ 1M logits on CPU, 16M on CUDA."""
    if chunk_size > 0:
        return chunk_size
    kind = torch.device(device).type if device is not None else "cpu"
    budget = _CHUNK_ELEMENTS.get(kind, _CHUNK_ELEMENTS["cuda"])
    return max(_MIN_CHUNK, budget // max(1, batch_size))


class _Workspace:
    """Chunk buffers reused by every chunk of one call: large fresh allocations page-fault on CPU."""

    def __init__(self, batch, chunk, dim, dtype, device, need_grad_buffer=False):
        self.logits = torch.empty(batch * chunk, dtype=dtype, device=device)  # viewed (B, k)
        self.rows = torch.empty(chunk * dim, dtype=dtype, device=device)  # viewed (k, D)
        self.grad = torch.empty(chunk * dim, dtype=dtype, device=device) if need_grad_buffer else None
        self.batch, self.dim = batch, dim

    def logits_view(self, k):
        return self.logits[:self.batch * k].view(self.batch, k)

    def rows_view(self, k):
        return self.rows[:k * self.dim].view(k, self.dim)

    def grad_view(self, k):
        return self.grad[:k * self.dim].view(k, self.dim)


def _rows_hat(weight, rows, c0, c1, normalize, dtype, out=None):
    """The chunk's rows (k, D), normalized when asked, and their norms (k,) (None when not normalizing).

    ``out`` (k, D) receives the result (a fresh tensor when None); the weight is never written.
    """
    if rows is None:
        src = weight[c0:c1]
    else:
        src = weight.index_select(0, rows[c0:c1]) if out is None or weight.dtype != dtype else \
            torch.index_select(weight, 0, rows[c0:c1], out=out)
    src = src.to(dtype)
    if not normalize:
        return src, None
    norm = torch.linalg.vector_norm(src, dim=1)  # (k,)
    denom = norm.clamp_min(_NORM_EPS)[:, None]
    return (src / denom if out is None else torch.div(src, denom, out=out)), norm


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


def _mask_targets_(logits, tpos, c0):
    """Sets logits[i, tpos_i - c0] = -inf where the target falls in this chunk (O(B), no host sync)."""
    k = logits.shape[1]
    col = (tpos - c0).clamp(0, k - 1)[:, None]  # (B, 1)
    inside = ((tpos >= c0) & (tpos < c0 + k))[:, None]
    logits.scatter_(1, col, torch.where(inside, float("-inf"), logits.gather(1, col)))


def _n_cols(weight, rows):
    return weight.shape[0] if rows is None else rows.numel()


def _forward_chunks(f_s, weight, rows, tpos, normalize, chunk, n_cached=0):
    """Online (max, sum exp) over the chunks; returns (lse (B,), max (B,), cache).

    The first ``n_cached`` chunks keep exp(l - shift) (B, k) and their row shift (B,) in
    ``cache`` so backward can skip recomputing them (the logit cache, off by default).
    """
    batch, n_cols = f_s.shape[0], _n_cols(weight, rows)
    ws = _Workspace(batch, min(chunk, max(n_cols, 1)), f_s.shape[1], f_s.dtype, f_s.device)
    run_max = f_s.new_full((batch,), float("-inf"))  # (B,)
    run_sum = f_s.new_zeros(batch)  # (B,)
    cache = []
    for j, c0 in enumerate(range(0, n_cols, chunk)):
        k = min(chunk, n_cols - c0)
        w_hat, _ = _rows_hat(weight, rows, c0, c0 + k, normalize, f_s.dtype, ws.rows_view(k))
        out = ws.logits_view(k) if j >= n_cached else f_s.new_empty(batch, k)
        logits = torch.mm(f_s, w_hat.t(), out=out)  # (B, k)
        _mask_targets_(logits, tpos, c0)
        new_max = torch.maximum(run_max, logits.amax(dim=1))  # (B,)
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        run_sum = run_sum * torch.exp(run_max - shift) + logits.sub_(shift[:, None]).exp_().sum(dim=1)
        run_max = new_max
        if j < n_cached:
            cache.append((logits, shift))
    shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
    return shift + torch.log(run_sum), run_max, cache


def _target_rows(weight, target_local, normalize, dtype):
    """Each row's (normalized) target row (B, D), norms (B,), and the owned mask (B,)."""
    owned = target_local >= 0
    idx = target_local.clamp(min=0)
    w_t, norm = _rows_hat(weight, idx, 0, idx.numel(), normalize, dtype)
    return w_t, norm, owned


class LocalShardStats(torch.autograd.Function):
    """(features, weight, rows, target_local, valid) -> (lse, target, max) with chunked recompute backward."""

    @staticmethod
    def forward(ctx, features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached):
        tpos = _target_positions(rows, target_local)  # (B,)
        lse, run_max, ctx.cache = _forward_chunks(features * scale, weight, rows, tpos, normalize, chunk, n_cached)
        neg_inf = torch.full_like(lse, float("-inf"))
        lse, run_max = torch.where(valid, lse, neg_inf), torch.where(valid, run_max, neg_inf)
        w_t, _, owned = _target_rows(weight, target_local, normalize, features.dtype)
        target = torch.where(owned, (features * w_t).sum(dim=1), torch.zeros_like(lse))  # (B,)
        ctx.save_for_backward(features, weight, rows, target_local, tpos, lse)
        ctx.scale, ctx.normalize, ctx.chunk, ctx.n_cached = scale, normalize, chunk, len(ctx.cache)
        ctx.mark_non_differentiable(run_max)
        return lse, target, run_max

    @staticmethod
    def backward(ctx, g_lse, g_target, _g_max):
        features, weight, rows, target_local, tpos, lse = ctx.saved_tensors
        if ctx.n_cached and ctx.cache is None:
            raise RuntimeError("backward ran twice through the head with logit_cache_mb > 0 (the cache is consumed "
                               "by the first backward); use logit_cache_mb=0 with retain_graph=True")
        grad_w = _WeightGrad(weight, rows, target_local, features.dtype)
        grad_f = _backward_chunks(features, weight, rows, tpos, g_lse, lse, grad_w, ctx)
        _add_target_grads(features, weight, target_local, g_target, ctx.normalize, grad_f, grad_w)
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.cache = None
        return (grad_f if need_f else None), (grad_w.finish() if need_w else None), *([None] * 7)


class _WeightGrad:
    """Accumulates the weight gradient: dense (C_local, D) or values over the touched rows only."""

    def __init__(self, weight, rows, target_local, dtype):
        self.shape, self.rows, self.dtype = weight.shape, rows, weight.dtype
        if rows is None:
            self.dense = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # every row written once
        else:
            owned = target_local[target_local >= 0]
            self.touched = torch.unique(torch.cat([rows, owned]))  # (n,) sorted
            self.values = torch.zeros(self.touched.numel(), weight.shape[1], dtype=dtype, device=weight.device)

    def chunk_out(self, c0, k, ws):
        """Where the chunk's (k, D) gradient is computed: its rows of the dense gradient, or a buffer."""
        return self.dense[c0:c0 + k] if self.rows is None else ws.grad_view(k)

    # index_put_ rather than index_add_: index_add_ is ~10x slower on CPU in torch 2.13 (measured)
    def commit_chunk(self, c0, grad):
        if self.rows is not None:  # the chunk's rows are distinct and not yet written
            self.values.index_put_((torch.searchsorted(self.touched, self.rows[c0:c0 + grad.shape[0]]),), grad)

    def add_rows(self, local_rows, grad):
        if self.rows is None:
            self.dense.index_put_((local_rows,), grad, accumulate=True)
        elif self.touched.numel():  # rows not owned carry zero gradient; clamp keeps them in bounds
            pos = torch.searchsorted(self.touched, local_rows).clamp(max=self.touched.numel() - 1)
            self.values.index_put_((pos,), grad, accumulate=True)

    def finish(self):
        if self.rows is None:
            return self.dense.to(self.dtype)
        return torch.sparse_coo_tensor(self.touched[None], self.values.to(self.dtype), self.shape, is_coalesced=True,
                                       check_invariants=False)


def _backward_chunks(features, weight, rows, tpos, g_lse, lse, grad_w, ctx):
    """Recomputes each chunk, fills grad_w and returns d loss / d features (B, D).

    G_ik = g_i exp(l_ik - lse_i) is formed in one exp as |g_i| exp(l_ik - lse_i + log|g_i|); the
    sign of g_i is applied to the small (B, D) operands instead of the (B, k) block.
    """
    batch, n_cols = features.shape[0], _n_cols(weight, rows)
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.full_like(lse, float("inf"))) - torch.log(g_lse.abs())  # (B,)
    sign = torch.where(finite, torch.sign(g_lse), torch.zeros_like(g_lse))[:, None]  # (B, 1)
    f_s = features * ctx.scale  # (B, D)
    f_signed = f_s * sign
    grad_f = torch.zeros_like(features)  # (B, D): sum_k |G_ik| w_hat_k, signed and scaled at the end
    ws = _Workspace(batch, min(ctx.chunk, max(n_cols, 1)), features.shape[1], features.dtype, features.device,
                    need_grad_buffer=rows is not None)
    for j, c0 in enumerate(range(0, n_cols, ctx.chunk)):
        k = min(ctx.chunk, n_cols - c0)
        w_hat, norm = _rows_hat(weight, rows, c0, c0 + k, ctx.normalize, features.dtype, ws.rows_view(k))
        if j < ctx.n_cached:  # exp(l - s_c) * exp(s_c - lse + log|g|), in place on the cached chunk
            cached, chunk_shift = ctx.cache[j]
            g_abs = cached.mul_(torch.exp(chunk_shift - shift)[:, None])
        else:
            logits = torch.mm(f_s, w_hat.t(), out=ws.logits_view(k))  # (B, k)
            _mask_targets_(logits, tpos, c0)
            g_abs = logits.sub_(shift[:, None]).exp_()  # (B, k) = |dL/dl|
        grad_f.addmm_(g_abs, w_hat)
        g_hat = torch.mm(g_abs.t(), f_signed, out=grad_w.chunk_out(c0, k, ws))  # (k, D) dL/dw_hat (scale in f_s)
        grad_w.commit_chunk(c0, _normalize_backward_(g_hat, w_hat, norm))
    return grad_f.mul_(sign).mul_(ctx.scale)


def _add_target_grads(features, weight, target_local, g_target, normalize, grad_f, grad_w):
    """Adds d target_i = <f_i, w_hat_y> to grad_f (B, D) and to the owned target rows of grad_w."""
    w_t, norm, owned = _target_rows(weight, target_local, normalize, features.dtype)
    g = torch.where(owned, g_target, torch.zeros_like(g_target))[:, None]  # (B, 1)
    grad_f.add_(g * w_t)
    g_hat = _normalize_backward_(g * features, w_t, norm)  # (B, D)
    grad_w.add_rows(target_local.clamp(min=0), torch.where(owned[:, None], g_hat, torch.zeros_like(g_hat)))


def torch_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, chunk_size=0,
                            logit_cache_mb=0.0):
    """The torch (reference, CPU) backend of the local shard statistics; see the module docstring.

    logit_cache_mb > 0 keeps up to that many MiB of the forward's exp'd logit chunks for
    backward, which then skips their recompute (one GEMM of 2 B k D per cached chunk).
    """
    chunk = auto_chunk_size(features.shape[0], chunk_size, features.device)
    chunk_bytes = features.shape[0] * chunk * features.element_size()
    n_cached = int(logit_cache_mb * (1 << 20) // max(chunk_bytes, 1)) if torch.is_grad_enabled() else 0
    return LocalShardStats.apply(features, weight, rows, target_local, valid, scale, normalize, chunk, n_cached)


_BACKENDS: dict[str, Callable] = {"torch": torch_local_shard_stats}


def register_local_backend(name: str, fn: Callable) -> None:
    """Registers a backend with the signature of ``torch_local_shard_stats`` (the fused kernels use this)."""
    _BACKENDS[name] = fn


def get_local_backend(name: str) -> Callable:
    """The backend for head ``fused`` = auto | torch | triton | <registered name>.

    The ``DSOFT_FUSED`` environment variable (auto | torch | triton) overrides ``name``.
    auto decides per call: the fused kernels on CUDA with tensor-core operands when Triton
    imports, the torch chunked path otherwise (CPU, float64, plain fp32, no Triton).
    """
    from dsoft_dist.kernels import auto_local_shard_stats, register_backends, requested_backend

    name = requested_backend(name)
    if name == "auto":
        return auto_local_shard_stats
    if name == "triton" and name not in _BACKENDS:
        register_backends()
    if name not in _BACKENDS:
        raise ValueError(f"fused={name!r} is not available; registered backends: {', '.join(sorted(_BACKENDS))} "
                         f"(use fused='torch' or 'auto')")
    return _BACKENDS[name]
