"""Fused Triton kernels for the sharded classifier head (installed as ``dsoft_dist.kernels``).

Nothing here is imported by the rest of the package unless Triton is installed and the
head selects the fused path; the torch path in ``dsoft_dist.head`` is the reference.
Importing this package never imports Triton: the kernels load on first use.

    from dsoft_dist.kernels import triton_available, requested_backend, triton_local_shard_stats
    lse, target, hardest = triton_local_shard_stats(features, weight, rows, target_local, valid, 64.0, True)

Backends (signature of ``dsoft_dist.head.local.torch_local_shard_stats``):
- ``triton_local_shard_stats``: the fused kernels; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Raises otherwise.
- ``auto_local_shard_stats``: the fused kernels when the inputs are on CUDA with tensor-core
  operands (a 16-bit weight/features, or TF32 allowed) and Triton imports; the torch chunked
  path otherwise (CPU, float64, plain fp32, no Triton).
- ``fused_path_usable(features, weight)``: the test ``auto`` applies.
- ``requested_backend(default)``: the ``DSOFT_FUSED`` environment override (auto | torch | triton).
- ``register_backends()``: registers ``triton`` with ``dsoft_dist.head.local.register_local_backend``.
"""
from dsoft_dist.kernels.backend import (BACKEND_NAMES, auto_local_shard_stats, fused_path_usable,
                                        register_backends, requested_backend, triton_available,
                                        triton_local_shard_stats)
from dsoft_dist.kernels.config import KernelConfig

__all__ = ["BACKEND_NAMES", "KernelConfig", "auto_local_shard_stats", "fused_path_usable", "register_backends",
           "requested_backend", "triton_available", "triton_local_shard_stats"]
