"""Triton backward of the local shard statistics: recompute each logit tile from the saved lse.

With c_ij = cos(f_i, w_j) and upstream (g_lse, g_target) (DESIGN.md §1 closed forms):

    A_ij = g_lse_i * scale * exp(scale c_ij - lse_i) [j negative for i] + g_target_i [id(j) == y_i]
         = dL/dc_ij,  (B, N) — never stored: each kernel recomputes its tiles
    grad f_i   = sum_j A_ij r_j w_j                                     (B, D)
    grad w_j   = r_j (sum_i A_ij f_i - (sum_i A_ij c_ij) r_j w_j)      (N, D), r_j = 1/max(|w_j|, eps)

(the second term of grad w is the chain through w/|w|; without normalization r = 1 and it is
absent). Two kernels, no atomics, fp32 accumulation:
- ``grad_features_kernel``: grid (row tiles, column splits, D slices); each split writes its
  partial sum to an (S, B, D) fp32 buffer that the launcher sums (deterministic).
- ``grad_weight_kernel``: grid (column tiles, D slices); each program walks every row tile
  and writes its rows of grad w (dense rows, or the touched-row values) in the weight dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dsoft_dist.kernels.shard_stats_fwd import NORM_EPS, load_columns, logit_tile, split_tiles


@triton.jit
def load_row_state(tgt_ptr, valid_ptr, lse_ptr, glse_ptr, gtgt_ptr, offs_m, B):
    """Per-row target id, valid mask, lse, g_lse (0 where lse = -inf) and g_target, each (BM,)."""
    m_mask = offs_m < B
    t = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    ok = (tl.load(valid_ptr + offs_m, mask=m_mask, other=0) != 0) & m_mask
    lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=float("-inf"))
    g_lse = tl.load(glse_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    g_lse = tl.where(lse > float("-inf"), g_lse, 0.0)  # no negatives here: no gradient (and no 0 * NaN)
    g_tgt = tl.load(gtgt_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    return t, ok, lse, g_lse, g_tgt, m_mask


@triton.jit
def grad_coef(raw, inv, col, is_neg, n_mask, t, ok, lse, g_lse, g_tgt, scale):
    """(A, c): A = dL/dc (BM, BN) fp32 for one recomputed tile of raw dots, c the cosines."""
    cos = raw * inv[None, :]
    is_t = (col[None, :] == t[:, None]) & n_mask[None, :]
    neg = is_neg[None, :] & ok[:, None] & (col[None, :] != t[:, None])
    p = tl.where(neg, tl.exp(cos * scale - lse[:, None]), 0.0)  # <= 1: lse includes every such term
    coef = (g_lse * scale)[:, None] * p + tl.where(is_t, g_tgt[:, None], 0.0)
    return coef, cos


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with both operands rounded to COMPUTE (then fp32 in the interpreter)."""
    a = a.to(COMPUTE)
    b = b.to(COMPUTE)
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grad_features_kernel(f_ptr, w_ptr, cols_ptr, neg_ptr, norm_ptr, tgt_ptr, valid_ptr, lse_ptr, glse_ptr,
                         gtgt_ptr, out_ptr, B, N, D, stride_fb, stride_fd, stride_wc, stride_wd,
                         tiles_per_split, scale,
                         GATHER: tl.constexpr, HAS_NEG: tl.constexpr, NORMALIZE: tl.constexpr,
                         COMPUTE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Grid (cdiv(B, BM), S, cdiv(D, BLOCK_D)): out[s, i, d-slice] = sum over split s of A_ij r_j w_j."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t, ok, lse, g_lse, g_tgt, m_mask = load_row_state(tgt_ptr, valid_ptr, lse_ptr, glse_ptr, gtgt_ptr, offs_m, B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    first, last = split_tiles(N, pid_s, tiles_per_split, BLOCK_N)
    for tile in range(first, last):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col, is_neg, n_mask, inv = load_columns(cols_ptr, neg_ptr, norm_ptr, offs_n, N, GATHER, HAS_NEG, NORMALIZE)
        raw = logit_tile(f_ptr, w_ptr, offs_m, m_mask, col, n_mask, D, stride_fb, stride_fd, stride_wc, stride_wd,
                         BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_FP32, PRECISION)
        coef, _ = grad_coef(raw, inv, col, is_neg, n_mask, t, ok, lse, g_lse, g_tgt, scale)
        w = tl.load(w_ptr + col[:, None] * stride_wc + offs_d[None, :] * stride_wd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BN, BLOCK_D)
        acc = _dot(coef * inv[None, :], w, acc, COMPUTE, DOT_FP32, PRECISION)
    out = out_ptr + (pid_s * B + offs_m.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def grad_weight_kernel(f_ptr, w_ptr, cols_ptr, neg_ptr, norm_ptr, tgt_ptr, valid_ptr, lse_ptr, glse_ptr,
                       gtgt_ptr, out_ptr, B, N, D, stride_fb, stride_fd, stride_wc, stride_wd, stride_oc,
                       stride_od, scale,
                       GATHER: tl.constexpr, HAS_NEG: tl.constexpr, NORMALIZE: tl.constexpr,
                       COMPUTE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Grid (cdiv(N, BN), cdiv(D, BLOCK_D)): out[j, d-slice] = grad w of column j (position j of the list)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col, is_neg, n_mask, inv = load_columns(cols_ptr, neg_ptr, norm_ptr, offs_n, N, GATHER, HAS_NEG, NORMALIZE)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # sum_i A_ij f_i
    radial = tl.zeros((BLOCK_N,), tl.float32)  # sum_i A_ij c_ij
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        t, ok, lse, g_lse, g_tgt, m_mask = load_row_state(tgt_ptr, valid_ptr, lse_ptr, glse_ptr, gtgt_ptr,
                                                          offs_m, B)
        raw = logit_tile(f_ptr, w_ptr, offs_m, m_mask, col, n_mask, D, stride_fb, stride_fd, stride_wc, stride_wd,
                         BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_FP32, PRECISION)
        coef, cos = grad_coef(raw, inv, col, is_neg, n_mask, t, ok, lse, g_lse, g_tgt, scale)
        radial += tl.sum(coef * cos, axis=0)
        f = tl.load(f_ptr + offs_m.to(tl.int64)[:, None] * stride_fb + offs_d[None, :] * stride_fd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BM, BLOCK_D)
        acc = _dot(tl.trans(coef), f, acc, COMPUTE, DOT_FP32, PRECISION)
    if NORMALIZE:  # chain through w / max(|w|, eps); below eps the norm is a constant (no radial part)
        norm = tl.load(norm_ptr + offs_n, mask=n_mask, other=1.0)
        radial = tl.where(norm > NORM_EPS, radial, 0.0)
        w = tl.load(w_ptr + col[:, None] * stride_wc + offs_d[None, :] * stride_wd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = inv[:, None] * (acc - (radial * inv)[:, None] * w)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_oc + offs_d[None, :] * stride_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])
