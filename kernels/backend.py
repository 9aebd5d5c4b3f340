"""The triton backend of the head's local shard statistics (the head's registry, dsoft_dist.head.backend, loads it).

    triton_path_usable(features, weight)  # CUDA tensors, tensor-core operands, Triton importable
    triton_local_shard_stats(...)         # the kernels, or a clear error when they cannot run

This module never imports Triton at import time, so ``import dsoft_dist.kernels`` works
without it; the kernels are imported on the first triton call.
"""
from __future__ import annotations

import os

import torch

from dsoft_dist.kernels.checks import TRITON_DTYPES
from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def triton_available() -> bool:
    """True when ``import triton`` succeeds (it may still lack a GPU to run on)."""
    try:
        import triton  # noqa: F401  (imported once; later calls hit sys.modules)
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton() -> None:
    if not triton_available():
        raise RuntimeError("the head's triton backend needs Triton: pip install 'dsoft_dist[kernels]' "
                           "(or triton>=3.0), or use backend='torch'")


def triton_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, *, chunk_size=0,
                             logit_cache_mb=0.0, config=None, compute_dtype=None):
    """The triton backend, same contract as ``dsoft_dist.head.local.torch_local_shard_stats``.

    features (B, D), weight (C_local, D) raw rows, rows (K,) sorted unique int64 or None,
    target_local (B,) int64 (-1 = not owned), valid (B,) bool -> (lse, target, max), each (B,) fp32.
    ``chunk_size`` and ``logit_cache_mb`` are accepted for the shared signature and unused
    (tiles replace chunks; backward always recomputes). ``config``: a KernelConfig (tile sizes);
    ``compute_dtype``: the GEMM operand dtype (default: the narrower of the two input dtypes).
    """
    _require_triton()
    from dsoft_dist.kernels.shard_stats import validated_triton_stats
    return validated_triton_stats(features, weight, rows, target_local, valid, scale, normalize,
                                  config=config, compute_dtype=compute_dtype)


def triton_path_usable(features: torch.Tensor, weight: torch.Tensor, compute_dtype=None) -> bool:
    """True when ``auto`` should run the kernels: CUDA tensors, Triton, and tensor-core operands.

    Tensor-core operands = a 16-bit ``compute_dtype``, a 16-bit weight or features (the GEMMs
    run in the narrower dtype), or fp32 with ``torch.backends.cuda.matmul.allow_tf32``. Plain fp32
    would run the kernels' GEMMs as IEEE fp32 FMA, likely slower than cuBLAS in the torch path, so
    auto keeps torch there.
    """
    if not (features.is_cuda and weight.is_cuda and features.dtype in TRITON_DTYPES
            and weight.dtype in TRITON_DTYPES):
        return False
    narrow = compute_dtype in (torch.float16, torch.bfloat16)
    tensor_cores = narrow or min(features.element_size(), weight.element_size()) < 4 or \
        torch.backends.cuda.matmul.allow_tf32
    return tensor_cores and triton_available()
