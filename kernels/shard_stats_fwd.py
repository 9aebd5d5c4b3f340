"""Triton forward of the local shard statistics: cosine GEMM and the dissected-softmax epilogue in one kernel.

Per program: one tile of global-batch rows (block_m) against a split of the column list
(the shard's rows, or the index-gathered touched rows), one (block_m, block_n) logit tile
at a time, the embedding dim in block_k steps. The epilogue per tile:

    cos_ij = <f_i, w_j> * r_j          r_j = 1 / max(|w_j|, 1e-12)  (1 when not normalizing)
    target_i += cos_ij        for the column j with id(j) == target_local_i  (z_y pick-up)
    l_ij = scale * cos_ij     for negatives: neg_j, id(j) != target_local_i, row valid
    online max m_i and sum s_i = sum exp(l_ij - m_i)

Only (max, sum, target) per (split, row) are written: (S, B) each, no (B, C) logits.
``row_norms_kernel`` is the pre-pass giving |w_j| of the (gathered) columns, fp32.
The helpers ``logit_tile`` and ``load_columns`` are shared with the backward kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps: the torch reference clamps the norm the same way


@triton.jit
def split_tiles(N, pid_s, tiles_per_split, BLOCK_N: tl.constexpr):
    """The column tiles [first, last) of split pid_s: tiles_per_split tiles of BLOCK_N columns each."""
    first = pid_s * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))


@triton.jit
def load_columns(cols_ptr, neg_ptr, norm_ptr, offs_n, N, GATHER: tl.constexpr, HAS_NEG: tl.constexpr,
                 NORMALIZE: tl.constexpr):
    """Column ids (BN,) int64 (weight rows), negative flags (BN,) and inverse norms r (BN,) fp32."""
    n_mask = offs_n < N
    if GATHER:
        col = tl.load(cols_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        col = offs_n.to(tl.int64)
    if HAS_NEG:
        is_neg = (tl.load(neg_ptr + offs_n, mask=n_mask, other=0) != 0) & n_mask
    else:
        is_neg = n_mask
    if NORMALIZE:
        norm = tl.load(norm_ptr + offs_n, mask=n_mask, other=1.0)
        inv = 1.0 / tl.maximum(norm, NORM_EPS)
    else:
        inv = tl.full(offs_n.shape, 1.0, tl.float32)
    return col, is_neg, n_mask, inv


@triton.jit
def logit_tile(f_ptr, w_ptr, offs_m, m_mask, col, n_mask, D, stride_fb, stride_fd, stride_wc, stride_wd,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Raw dots <f_i, w_col_j> (BLOCK_M, BLOCK_N) fp32, operands cast to COMPUTE, D in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows_m = offs_m.to(tl.int64)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        a = tl.load(f_ptr + rows_m[:, None] * stride_fb + offs_k[None, :] * stride_fd,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(COMPUTE)  # (BM, BK)
        b = tl.load(w_ptr + col[None, :] * stride_wc + offs_k[:, None] * stride_wd,
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(COMPUTE)  # (BK, BN)
        if DOT_FP32:  # interpreter: bf16 tl.dot is wrong there; exact bf16 products in fp32 match the GPU
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def shard_stats_fwd_kernel(f_ptr, w_ptr, cols_ptr, neg_ptr, norm_ptr, tgt_ptr, valid_ptr,
                           max_ptr, sum_ptr, target_ptr,
                           B, N, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split, scale,
                           GATHER: tl.constexpr, HAS_NEG: tl.constexpr, NORMALIZE: tl.constexpr,
                           COMPUTE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(B, BLOCK_M), S): writes max/sum/target partials (S, B) fp32 for split program_id(1)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    t = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)  # (BM,) local target row or -1
    ok = (tl.load(valid_ptr + offs_m, mask=m_mask, other=0) != 0) & m_mask
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    first, last = split_tiles(N, pid_s, tiles_per_split, BLOCK_N)
    for tile in range(first, last):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col, is_neg, n_mask, inv = load_columns(cols_ptr, neg_ptr, norm_ptr, offs_n, N, GATHER, HAS_NEG, NORMALIZE)
        raw = logit_tile(f_ptr, w_ptr, offs_m, m_mask, col, n_mask, D, stride_fb, stride_fd, stride_wc, stride_wd,
                         BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_FP32, PRECISION)
        cos = raw * inv[None, :]  # (BM, BN)
        is_t = (col[None, :] == t[:, None]) & n_mask[None, :]
        target += tl.sum(tl.where(is_t, cos, 0.0), axis=1)
        neg = is_neg[None, :] & ok[:, None] & (col[None, :] != t[:, None])
        logits = tl.where(neg, cos * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows without negatives yet
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        run_max = new_max
    out = pid_s * B + offs_m
    tl.store(max_ptr + out, run_max, mask=m_mask)
    tl.store(sum_ptr + out, run_sum, mask=m_mask)
    tl.store(target_ptr + out, target, mask=m_mask)


@triton.jit
def row_norms_kernel(w_ptr, cols_ptr, norm_ptr, N, D, stride_wc, stride_wd, GATHER: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N),): norm_j = |w_col_j| (N,) fp32, summing squares in fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if GATHER:
        col = tl.load(cols_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        col = offs_n.to(tl.int64)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + col[:, None] * stride_wc + offs_k[None, :] * stride_wd,
                    mask=n_mask[:, None] & (offs_k[None, :] < D), other=0.0).to(tl.float32)
        sq += tl.sum(w * w, axis=1)
    tl.store(norm_ptr + offs_n, tl.sqrt(sq), mask=n_mask)
