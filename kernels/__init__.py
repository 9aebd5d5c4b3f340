"""Kernels for the sharded classifier head (installed as ``dsoft_dist.kernels``): Triton and compiled C.

The head's backend registry (``dsoft_dist.head.backend``) imports this package only when its
``triton`` or ``cpu-c`` backend is selected (or ``auto`` meets CUDA inputs); nothing here
imports ``dsoft_dist.head`` or ``dsoft_dist.bench``. Importing it never imports Triton: the
kernels load on first use.

    from dsoft_dist.kernels import triton_available, triton_local_shard_stats
    lse, target, hardest = triton_local_shard_stats(features, weight, rows, target_local, valid, 64.0, True)

- ``triton_local_shard_stats``: the Triton kernels (signature of
  ``dsoft_dist.head.local.torch_local_shard_stats``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Raises otherwise.
- ``triton_path_usable(features, weight)``: CUDA inputs with tensor-core operands (a 16-bit
  weight/features, or TF32 allowed) and Triton importable: the test ``auto`` applies.
- ``dsoft_dist.kernels.cpu.cpu_epilogues()``: the cpu-c backend's compiled passes.
"""
from dsoft_dist.kernels.backend import triton_available, triton_local_shard_stats, triton_path_usable
from dsoft_dist.kernels.config import KernelConfig

__all__ = ["KernelConfig", "triton_available", "triton_local_shard_stats", "triton_path_usable"]
