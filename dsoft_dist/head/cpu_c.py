"""The cpu-c backend: the torch path with its elementwise passes compiled from C (opt in, CPU float32).

    head = ShardedClassifier(..., backend="cpu-c")    # or head.backend: cpu-c, DSOFT_HEAD_BACKEND=cpu-c

On CPU a chunk's passes between its GEMMs (scale by 1/|w|, shift, mask the target, max,
exp, sum; in backward the block, the target coefficient and the radial sum) each re-read a
(k, B) block the GEMM has pushed out of L2; ``kernels/cpu_epilogue.c`` does each chunk's
passes in one (``dsoft_dist.kernels.cpu``, compiled on first use with the system C
compiler). Its code works in base 2 (logits scaled by log2 e, so every exp is an exp2) and,
after the first chunk, with one fixed shift per row instead of the running max:

    Cosine logits are bounded, |l_ik| <= b_i = |f_s_i| (base 2); with m_i the first chunk's
    max and n the rows, t_i = max(min(b_i, m_i + 64), b_i + log2 n - 126) keeps every term
    <= 2^126 / n (their sum cannot overflow) and the largest term >= 2^-64, or
    >= 2^(126 - 2 b_i - log2 n) >= 2^(log2 n - 102) when b + log2 n <= 114
    (``fixed_shift_ok``): the terms fp32 loses below 2^-126 (n of them at most) stay under
    2^-24 of the sum.

Without a C compiler (or with DSOFT_CPU_KERNELS=0), for unnormalized rows or other dtypes
and devices, the backend runs the torch passes (``dsoft_dist.head.local.TorchPasses``).
It is opt in: the head must not need a compiler. Side by side on the 2-core CPU it takes 4-7%
off the whole head step against the torch backend, almost all of it in the forward
(docs/benchmarks/head-cpu-issue17.txt, section 3).
"""
from __future__ import annotations

import math

import torch

from dsoft_dist.head.local import TorchPasses, torch_local_shard_stats

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FIXED_SHIFT_LIMIT = 114.0  # one shift per row serves every chunk when scale * log2(e) + log2(rows) <= this


def fixed_shift_ok(scale, n_cols, normalize):
    """True when one shift per row serves every forward chunk (cosine logits; see the module docstring)."""
    return normalize and scale * _LOG2E + math.log2(max(n_cols, 2)) <= _FIXED_SHIFT_LIMIT


class CpuCPasses(TorchPasses):
    """The chunk passes in base 2 with the compiled epilogues ``epi`` (normalized rows, float32 on CPU).

    The first chunk (every chunk when the fixed shift's bound does not hold) takes the online
    step of ``TorchPasses`` in base 2; after it run_max is relative to the fixed shift.
    """

    unit = _LOG2E
    exp = staticmethod(torch.exp2)
    exp_ = staticmethod(torch.Tensor.exp2_)

    def __init__(self, epi, scale):
        self.epi, self.scale = epi, scale

    def start(self, f_scaled, n_cols):
        super().start(f_scaled, n_cols)
        self.neg_shift = None  # (1, B) -t once the fixed shift is set
        self.f_scaled, self.n_cols = f_scaled, n_cols
        self.fixed = fixed_shift_ok(self.scale, n_cols, True)

    def forward_chunk(self, j, logits, inv, padded, slots, cached):
        k = logits.shape[0]
        if self.neg_shift is not None and not cached:  # one compiled pass
            self.epi.forward_fixed(logits, inv, self.neg_shift, slots.int32(), j, self.run_max, self.run_sum)
        elif self.neg_shift is not None:  # l - t in one pass (a cached chunk keeps its exps)
            torch.addcmul(self.neg_shift, logits, inv, out=logits)
            padded.scatter_(0, slots.index(j, k), float("-inf"))
            torch.maximum(self.run_max, logits.amax(dim=0), out=self.run_max)
            self.run_sum.add_(logits.exp2_().sum(dim=0))
        else:  # online, in base 2
            super().forward_chunk(j, logits, inv, padded, slots, cached)
        used = self.shift
        if self.fixed and j == 0:  # t from the first chunk's max; run_sum and run_max move to it
            bound = torch.linalg.vector_norm(self.f_scaled, dim=1)  # (B,)
            t = torch.maximum(torch.minimum(bound, self.run_max + 64.0),
                              bound + (math.log2(max(self.n_cols, 2)) - 126.0))
            self.run_sum.mul_(torch.exp2(self.shift - t))
            self.run_max, self.shift, self.neg_shift = self.run_max - t, t, -t[None, :]
        return used

    def finish(self):
        run_max = self.run_max + self.shift if self.neg_shift is not None else self.run_max
        return (self.shift + torch.log2(self.run_sum)) * _LN2, run_max * _LN2

    def begin_backward(self, bc, width):
        self.sign_ln2 = bc.sign * -_LN2  # (B,): the radial sum in natural units, negated
        self.radial = bc.f_signed.new_empty(width)  # (k,)

    def backward_block(self, j, logits, inv, inv_sq, bc):
        """The block's passes in one, in place over the logits (which become the block)."""
        radial = self.radial[:logits.shape[0]]
        self.epi.backward_block(logits, inv, inv_sq, bc.neg_shift, bc.slots.int32(), j, bc.target_coef,
                                self.sign_ln2, radial)
        return logits, radial


def cpu_c_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, *, chunk_size=0,
                            logit_cache_mb=0.0, row_update=None, compute_dtype=None):
    """The cpu-c backend (signature of ``torch_local_shard_stats``): compiled passes where they apply."""
    from dsoft_dist.kernels.cpu import cpu_epilogues
    epi = cpu_epilogues()
    usable = epi is not None and normalize and features.device.type == "cpu" and features.dtype == torch.float32
    passes = CpuCPasses(epi, scale) if usable else TorchPasses()
    return torch_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize,
                                   chunk_size=chunk_size, logit_cache_mb=logit_cache_mb, row_update=row_update,
                                   passes=passes)
