"""Launchers and the autograd.Function of the triton backend's local shard statistics.

    lse, target, hardest = validated_triton_stats(features, weight, rows, target_local, valid, 64.0, True)

Same contract as ``dsoft_dist.head.local.torch_local_shard_stats`` (see its docstring):
features (B, D), weight (C_local, D) raw rows, rows (K,) sorted unique int64 or None ->
(lse, target, max) each (B,) fp32; grad weight dense (C_local, D) when rows is None, else
a coalesced sparse COO tensor over the touched rows = rows U owned targets.

Column list: rows=None uses the shard's rows in place (no gather, every row a negative).
Otherwise the kernels read W by index from ``touched`` = unique(rows U owned targets),
with a per-column flag for "is a negative": an owned target outside ``rows`` is read for
z_y and its gradient but is never a negative. Pipeline per call (kernel files in brackets):
    norms of the columns (N,) fp32             [row_norms_kernel]          (normalize only)
    per-split (max, sum, target) partials (S, B) [shard_stats_fwd_kernel] -> combined here, O(S B)
    backward: grad f partials (S', B, D) fp32  [grad_features_kernel]     -> summed here
              grad w rows (N, D)               [grad_weight_kernel]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsoft_dist.kernels.checks import check_shard_inputs
from dsoft_dist.kernels.config import KernelConfig, default_config, next_pow2
from dsoft_dist.kernels.shard_stats_bwd import grad_features_kernel, grad_weight_kernel
from dsoft_dist.kernels.shard_stats_fwd import row_norms_kernel, shard_stats_fwd_kernel

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_PROGRAMS_PER_SM = 4  # splits aim for this many programs per SM (a few waves hide the tail)
_FEATURE_PARTIAL_BYTES = 256 << 20  # cap of the (S', B, D) fp32 grad-feature partials


def kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at first import).

    Triton fixes interpreter vs compiler per @triton.jit function when it is defined, its own
    library (tl.zeros, ...) at ``import triton``: a mix cannot run, so it is refused here.
    """
    from triton.runtime.interpreter import InterpretedFunction
    ours = isinstance(shard_stats_fwd_kernel, InterpretedFunction)
    jit_types = (triton.JITFunction, InterpretedFunction)
    library = isinstance(tl.zeros, InterpretedFunction) if isinstance(tl.zeros, jit_types) else ours
    if ours != library:
        raise RuntimeError("Triton was imported with TRITON_INTERPRET=%s but dsoft_dist.kernels with %s: set "
                           "TRITON_INTERPRET=1 (CPU) before the first `import triton` in the process, e.g. at the "
                           "top of conftest.py" % ("1" if library else "unset", "1" if ours else "unset"))
    return ours


def _num_programs_target(device: torch.device, interpreted: bool) -> int:
    if interpreted or device.type != "cuda":
        return 1
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _split(n_tiles: int, want: int) -> tuple[int, int]:
    """(splits, tiles per split) covering n_tiles with about ``want`` splits, none empty."""
    per = triton.cdiv(max(n_tiles, 1), max(1, min(want, max(n_tiles, 1))))
    return triton.cdiv(max(n_tiles, 1), per), per


def column_list(rows, target_local):
    """(cols (N,) int64 or None, neg (N,) int8 or None): the columns the kernels read.

    None, None for all rows. Otherwise cols = unique(rows U owned targets) (sorted) and
    neg marks the columns that are negatives (None when every column is one).
    """
    if rows is None:
        return None, None
    cols = torch.unique(torch.cat([rows, target_local[target_local >= 0]]))  # sorted, one host sync
    if cols.numel() == rows.numel():
        return cols, None
    neg = torch.zeros(cols.numel(), dtype=torch.int8, device=cols.device)
    neg[torch.searchsorted(cols, rows)] = 1
    return cols, neg


class _Launch:
    """Everything the three kernels share for one call: pointers, sizes, constexprs, config."""

    def __init__(self, features, weight, cols, neg, normalize, scale, cfg, compute_dtype, interpreted):
        self.f, self.w, self.cols, self.neg = features, weight, cols, neg
        self.batch, self.dim = features.shape
        self.n_cols = weight.shape[0] if cols is None else cols.numel()
        self.cfg, self.scale, self.normalize = cfg, float(scale), bool(normalize)
        self.device, self.interpreted = features.device, interpreted
        fp32 = compute_dtype == torch.float32
        # fp32 operands: TF32 only when torch allows it (off by default); 16-bit operands ignore the setting
        tf32 = not interpreted and (not fp32 or torch.backends.cuda.matmul.allow_tf32)
        self.const = dict(GATHER=cols is not None, HAS_NEG=neg is not None, NORMALIZE=self.normalize,
                          COMPUTE=_TL_DTYPES[compute_dtype], DOT_FP32=interpreted and not fp32,
                          PRECISION="tf32" if tf32 else "ieee")
        self.warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.block_d = cfg.block_d or next_pow2(self.dim)
        self.norm = None

    def ptr(self, t):
        """A tensor for an unused pointer argument (the constexpr branch never reads it)."""
        return self.f if t is None else t

    def strides(self):
        return (*self.f.stride(), *self.w.stride())

    def row_norms(self):
        """(N,) fp32 norms of the columns (only when normalizing)."""
        if not self.normalize or self.n_cols == 0:
            return
        self.norm = torch.empty(self.n_cols, dtype=torch.float32, device=self.device)
        grid = (triton.cdiv(self.n_cols, self.cfg.block_n),)
        row_norms_kernel[grid](self.w, self.ptr(self.cols), self.norm, self.n_cols, self.dim, *self.w.stride(),
                               GATHER=self.const["GATHER"], BLOCK_N=self.cfg.block_n, BLOCK_K=self.cfg.block_k)

    def forward(self, target_local, valid):
        """(lse, target, max) (B,) fp32 from the per-split partials."""
        cfg = self.cfg
        if self.batch == 0:  # nothing to launch (a grid dim of 0 is not a valid launch)
            empty = torch.empty(0, dtype=torch.float32, device=self.device)
            return empty, empty.clone(), empty.clone()
        row_tiles = triton.cdiv(self.batch, cfg.block_m)
        want = cfg.col_splits or triton.cdiv(_num_programs_target(self.device, self.interpreted), row_tiles)
        splits, per = _split(triton.cdiv(self.n_cols, cfg.block_n), want)
        parts = torch.empty(3, splits, self.batch, dtype=torch.float32, device=self.device)  # max, sum, target
        shard_stats_fwd_kernel[(row_tiles, splits)](
            self.f, self.w, self.ptr(self.cols), self.ptr(self.neg), self.ptr(self.norm), target_local, valid,
            parts[0], parts[1], parts[2], self.batch, self.n_cols, self.dim, *self.strides(), per, self.scale,
            **self.const, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **self.warps)
        return combine_partials(parts[0], parts[1], parts[2], valid)

    def grad_features(self, row_state):
        """(B, D) fp32: the sum over column splits of the grad_features_kernel partials."""
        cfg = self.cfg
        row_tiles, d_slices = triton.cdiv(self.batch, cfg.bwd_block_m), triton.cdiv(self.dim, self.block_d)
        n_tiles = triton.cdiv(self.n_cols, cfg.bwd_block_n)
        want = cfg.feature_splits or triton.cdiv(_num_programs_target(self.device, self.interpreted),
                                                 row_tiles * d_slices)
        want = max(1, min(want, _FEATURE_PARTIAL_BYTES // max(1, 4 * self.batch * self.dim)))
        splits, per = _split(n_tiles, want)
        parts = torch.empty(splits, self.batch, self.dim, dtype=torch.float32, device=self.device)
        grad_features_kernel[(row_tiles, splits, d_slices)](
            self.f, self.w, self.ptr(self.cols), self.ptr(self.neg), self.ptr(self.norm), *row_state, parts,
            self.batch, self.n_cols, self.dim, *self.strides(), per, self.scale, **self.const,
            BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_K=cfg.block_k, BLOCK_D=self.block_d,
            **self.warps)
        return parts.sum(dim=0) if splits > 1 else parts[0]

    def grad_weight(self, row_state):
        """(N, D) in the weight dtype: rows of the column list, in its order."""
        cfg = self.cfg
        out = torch.empty(self.n_cols, self.dim, dtype=self.w.dtype, device=self.device)
        if self.n_cols == 0:
            return out
        grid = (triton.cdiv(self.n_cols, cfg.bwd_block_n), triton.cdiv(self.dim, self.block_d))
        grad_weight_kernel[grid](
            self.f, self.w, self.ptr(self.cols), self.ptr(self.neg), self.ptr(self.norm), *row_state, out,
            self.batch, self.n_cols, self.dim, *self.strides(), *out.stride(), self.scale, **self.const,
            BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_K=cfg.block_k, BLOCK_D=self.block_d,
            **self.warps)
        return out


def combine_partials(part_max, part_sum, part_target, valid):
    """(S, B) partials -> lse = M + log sum_s s_s exp(m_s - M), max M, target sum_s t_s; -inf where invalid."""
    run_max = part_max.amax(dim=0)  # (B,)
    shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
    total = (part_sum * torch.exp(part_max - shift)).sum(dim=0)
    neg_inf = torch.full_like(run_max, float("-inf"))
    lse = torch.where(valid, shift + torch.log(total), neg_inf)
    return lse, part_target.sum(dim=0), torch.where(valid, run_max, neg_inf)


class TritonLocalShardStats(torch.autograd.Function):
    """(features, weight, cols, neg, target_local, valid) -> (lse, target, max); recompute backward in the kernels."""

    @staticmethod
    def forward(ctx, features, weight, cols, neg, target_local, valid, scale, normalize, cfg, compute_dtype,
                interpreted):
        launch = _Launch(features, weight, cols, neg, normalize, scale, cfg, compute_dtype, interpreted)
        launch.row_norms()
        lse, target, run_max = launch.forward(target_local, valid)
        ctx.save_for_backward(features, weight, cols, neg, launch.norm, target_local, valid, lse)
        launch.f = launch.w = launch.cols = launch.neg = launch.norm = None  # saved tensors hold them
        ctx.launch, ctx.weight_shape = launch, weight.shape
        ctx.mark_non_differentiable(run_max)
        return lse, target, run_max

    @staticmethod
    def backward(ctx, g_lse, g_target, _g_max):
        features, weight, cols, neg, norm, target_local, valid, lse = ctx.saved_tensors
        launch = ctx.launch
        launch.f, launch.w, launch.cols, launch.neg, launch.norm = features, weight, cols, neg, norm
        row_state = (target_local, valid, lse, g_lse.float().contiguous(), g_target.float().contiguous())
        grad_f = grad_w = None
        if ctx.needs_input_grad[0] and features.shape[0]:
            grad_f = launch.grad_features(row_state).to(features.dtype)
        elif ctx.needs_input_grad[0]:
            grad_f = torch.zeros_like(features)
        if ctx.needs_input_grad[1]:
            values = launch.grad_weight(row_state) if features.shape[0] else \
                torch.zeros(launch.n_cols, features.shape[1], dtype=weight.dtype, device=weight.device)
            grad_w = values if cols is None else torch.sparse_coo_tensor(
                cols[None], values, ctx.weight_shape, is_coalesced=True, check_invariants=False)
        return grad_f, grad_w, *([None] * 9)


def _compute_dtype(features, weight, compute_dtype):
    if compute_dtype is None:  # the narrower operand decides: bf16/fp16 weights run the GEMMs on tensor cores
        return weight.dtype if weight.element_size() < features.element_size() else features.dtype
    if compute_dtype not in _TL_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype} is invalid; use torch.float32, float16 or bfloat16")
    return compute_dtype


def validated_triton_stats(features, weight, rows, target_local, valid, scale, normalize, config=None,
                           compute_dtype=None):
    """The triton backend (inputs checked first); see the module docstring and ``triton_local_shard_stats``."""
    interpreted = kernels_interpreted()
    check_shard_inputs(features, weight, rows, target_local, valid, scale, interpreted)
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a dsoft_dist.kernels.KernelConfig, got {type(config).__name__}")
    cfg = config or default_config(features.shape[1], interpreted)
    cdtype = _compute_dtype(features, weight, compute_dtype)
    cols, neg = column_list(rows, target_local)
    return TritonLocalShardStats.apply(features.contiguous(), weight, cols, neg, target_local.contiguous(),
                                      valid.contiguous(), float(scale), bool(normalize), cfg, cdtype, interpreted)
