"""The column chunks of one class shard: which rows, their buffers, norms and target slots.

The local statistics (``dsoft_dist.head.local``) walk the shard's columns (all its rows, or
the sampled ``rows``) in chunks of ``chunk`` rows, so no (B, C_local) logit matrix exists.
This file holds what the forward and backward loops share: ``ChunkPlan`` (the columns and
their chunks), ``Workspace`` (buffers reused by every chunk), ``TargetSlots`` (where each
batch row's target sits in a chunk) and the row-normalization helpers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NORM_EPS = 1e-12  # the eps of F.normalize, so the references agree to rounding
# automatic chunk size, in logits per chunk (B * chunk): on CPU a chunk's logits should stay
# cache-resident across the passes after its GEMM (mask, exp, sum): 1M fp32 = 4 MiB measured ~10%
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


@dataclass
class ChunkPlan:
    """The shard's columns: ``weight`` (C_local, D) raw rows, ``rows`` (K,) sorted local ids or None (all
    rows), ``chunk`` rows per chunk, computed in ``dtype``."""

    weight: torch.Tensor
    rows: torch.Tensor | None
    chunk: int
    dtype: torch.dtype

    def __post_init__(self):
        self.n_cols = self.weight.shape[0] if self.rows is None else self.rows.numel()
        self.n_chunks = -(-self.n_cols // self.chunk)
        self.width = min(self.chunk, max(self.n_cols, 1))  # the widest chunk
        # slices of the weight are views made in one call; sampled rows are gathered per chunk
        self._views = self.weight.split(self.chunk) if self.rows is None and self.weight.dtype == self.dtype else None

    def bounds(self, j: int) -> tuple[int, int]:
        """(first column, number of columns) of chunk j."""
        c0 = j * self.chunk
        return c0, min(self.chunk, self.n_cols - c0)

    def source(self, j: int, ws: "Workspace") -> torch.Tensor:
        """Chunk j's raw rows (k, D) in ``dtype``: a view of the weight when possible, else gathered."""
        if self._views is not None:
            return self._views[j]
        c0, k = self.bounds(j)
        if self.rows is None:
            return self.weight[c0:c0 + k].to(self.dtype)
        out = ws.rows_view(k)
        if out is None or self.weight.dtype != self.dtype:
            return self.weight.index_select(0, self.rows[c0:c0 + k]).to(self.dtype)
        return torch.index_select(self.weight, 0, self.rows[c0:c0 + k], out=out)


class Workspace:
    """Chunk buffers reused by every chunk of one call: large fresh allocations page-fault on CPU.

    Logit chunks are laid out class-major, (k, B): the GEMMs W_c F^T and G_c F run ~8% faster
    on CPU than their batch-major transposes (measured at B = D = 512, k = 2048). The logit buffer
    holds one spare row after the chunk's k rows (see ``TargetSlots``); backward writes each chunk's
    block over its logits, so one buffer of (k + 1, B) serves both loops.
    """

    def __init__(self, plan: ChunkPlan, batch: int, dim: int, device, *, grad_buffer=False):
        chunk, dtype = plan.width, plan.dtype
        self.logits = torch.empty((chunk + 1) * batch, dtype=dtype, device=device)  # viewed (k + 1, B)
        # gathered (sampled) rows are copied into a buffer (k, D); a slice of all rows is a view of the
        # weight. The chunk's gradient has a buffer unless it is written into the gradient itself.
        gathered = plan.rows is not None
        self.rows = torch.empty(chunk * dim, dtype=dtype, device=device) if gathered else None
        self.grad = torch.empty(chunk * dim, dtype=dtype, device=device) if grad_buffer else None
        self.batch, self.dim = batch, dim
        self._views = {}

    def logits_view(self, k):
        """(k + 1, B): the chunk's logits in the first k rows, then the spare row (views made once per k)."""
        view = self._views.get(k)
        if view is None:
            view = self._views[k] = self.logits[:(k + 1) * self.batch].view(k + 1, self.batch)
        return view

    def rows_view(self, k):
        return None if self.rows is None else self.rows[:k * self.dim].view(k, self.dim)

    def grad_view(self, k):
        return self.grad[:k * self.dim].view(k, self.dim)


class TargetSlots:
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


def target_positions(rows, target_local):
    """(B,) position of each row's target in the column list (rows or all rows), -1 if absent."""
    if rows is None:
        return target_local
    if rows.numel() == 0:
        return torch.full_like(target_local, -1)
    pos = torch.searchsorted(rows, target_local.clamp(min=0)).clamp(max=rows.numel() - 1)  # (B,)
    hit = (target_local >= 0) & (rows[pos] == target_local)
    return torch.where(hit, pos, torch.full_like(pos, -1))


def target_rows(weight, target_local, normalize, dtype):
    """Each batch row's (normalized) target row (B, D), its norm (B,) (None when not normalizing) and the
    owned mask (B,)."""
    owned = target_local >= 0
    src = weight.index_select(0, target_local.clamp(min=0)).to(dtype)
    if not normalize:
        return src, None, owned
    norm = torch.linalg.vector_norm(src, dim=1)  # (B,)
    return src / norm.clamp_min(NORM_EPS)[:, None], norm, owned


def inv_norm(norm, out=None):
    """1 / max(|w_k|, eps) (the shape of ``norm``, in ``out`` when given): the factor that turns raw-row
    logits into cosine logits."""
    return torch.clamp_min(norm, NORM_EPS, out=out).reciprocal_()


def inv_norms_into(src, norm_out, inv_out):
    """Writes the rows' norms (k,) into ``norm_out`` and returns 1 / max(|w_k|, eps) (k, 1) in ``inv_out``."""
    torch.linalg.vector_norm(src, dim=1, out=norm_out)
    return inv_norm(norm_out[:, None], out=inv_out)


def normalize_backward_(grad_hat, w_hat, norm):
    """In place: the gradient through w_hat = w / max(|w|, eps), i.e. (g - w_hat <w_hat, g>) / |w| (g / eps below eps)."""
    if norm is None:
        return grad_hat
    radial = torch.einsum("kd,kd->k", w_hat, grad_hat)  # (k,) without a (k, D) temporary
    radial = torch.where(norm > NORM_EPS, radial, torch.zeros_like(radial))
    grad_hat.addcmul_(w_hat, radial[:, None], value=-1.0)
    return grad_hat.div_(norm.clamp_min(NORM_EPS)[:, None])
