"""The head's backends for its local shard statistics: one registry, owned by the head.

    torch   the chunked torch path (dsoft_dist.head.local), the reference; takes row updates
    cpu-c   the torch path with its elementwise passes compiled from C (dsoft_dist.kernels.cpu):
            float32 on CPU, opt in (4-7% of a CPU step, measured; needs a C compiler); takes row updates
    triton  the Triton kernels (dsoft_dist.kernels): CUDA, or CPU under TRITON_INTERPRET=1
    auto    per call: triton for CUDA inputs with tensor-core operands when Triton imports,
            torch otherwise (the default)

Every backend has the signature of ``torch_local_shard_stats`` (features, weight, rows,
target_local, valid, scale, normalize, *, chunk_size, logit_cache_mb, row_update,
compute_dtype) -> (lse, target, max), each (B,): the per-row statistics forward and a
recompute backward. ``dsoft_dist.kernels`` is imported only when triton or cpu-c is selected,
or when auto meets CUDA inputs: the head never needs it on CPU. The ``DSOFT_HEAD_BACKEND``
environment variable overrides the head's choice.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from dsoft_dist.head.local import torch_local_shard_stats

BACKEND_NAMES = ("auto", "torch", "cpu-c", "triton")
ENV_VAR = "DSOFT_HEAD_BACKEND"
_ROW_UPDATES = {"torch", "cpu-c"}  # backends that take row updates (the step in backward, chunk by chunk)


def env_override(variable: str, choices, default, setting: str):
    """``variable``'s value (stripped, lower case) if set, else ``default``: how the head's environment
    variables override its settings. Raises ValueError naming the variable, the value and the choices."""
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{variable}={value!r} is invalid; use one of {', '.join(choices)} "
                         f"(or unset it to use the head's {setting}= setting)")
    return value


def requested_backend(default: str = "auto") -> str:
    """The backend to use: ``DSOFT_HEAD_BACKEND`` (auto | torch | cpu-c | triton) if set, else ``default``."""
    return env_override(ENV_VAR, BACKEND_NAMES, default, "backend")


def triton_usable(features: torch.Tensor, weight: torch.Tensor, compute_dtype=None) -> bool:
    """auto's test: CUDA inputs with tensor-core operands and Triton importable (kernels imported only then)."""
    if not (features.is_cuda and weight.is_cuda):
        return False
    from dsoft_dist.kernels import triton_path_usable
    return triton_path_usable(features, weight, compute_dtype)


def auto_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, *, chunk_size=0,
                           logit_cache_mb=0.0, row_update=None, compute_dtype=None):
    """The triton backend when ``triton_usable``, the torch path otherwise (per call)."""
    if row_update is None and triton_usable(features, weight, compute_dtype):
        from dsoft_dist.kernels import triton_local_shard_stats
        return triton_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize,
                                        compute_dtype=compute_dtype)
    return torch_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize,
                                   chunk_size=chunk_size, logit_cache_mb=logit_cache_mb, row_update=row_update)


def _triton(*args, row_update=None, **kwargs):
    from dsoft_dist.kernels import triton_local_shard_stats
    return triton_local_shard_stats(*args, **kwargs)


def _cpu_c(*args, **kwargs):
    from dsoft_dist.head.cpu_c import cpu_c_local_shard_stats
    return cpu_c_local_shard_stats(*args, **kwargs)


_BACKENDS: dict[str, Callable] = {"auto": auto_local_shard_stats, "torch": torch_local_shard_stats,
                                  "cpu-c": _cpu_c, "triton": _triton}


def register_local_backend(name: str, fn: Callable, takes_row_updates: bool = False) -> None:
    """Adds a backend with the signature of ``torch_local_shard_stats`` (``takes_row_updates``: it honours
    ``row_update``, so the head can step its optimizer inside backward through it)."""
    _BACKENDS[name] = fn
    if takes_row_updates:
        _ROW_UPDATES.add(name)


def get_local_backend(name: str) -> str:
    """The name of the selected backend (``DSOFT_HEAD_BACKEND`` overrides ``name``); raises ValueError if unknown."""
    name = requested_backend(name)
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is not available; registered backends: "
                         f"{', '.join(sorted(_BACKENDS))} (use backend='auto' or 'torch')")
    return name


def local_stats_fn(name: str) -> Callable:
    """The backend's function."""
    return _BACKENDS[name]


def takes_row_updates(name: str, features: torch.Tensor, weight: torch.Tensor, compute_dtype=None) -> bool:
    """True when backend ``name`` runs a path that takes ``row_update`` for these inputs."""
    if name == "auto":
        return not triton_usable(features, weight, compute_dtype)
    return name in _ROW_UPDATES


def describe_local_path(name: str, features: torch.Tensor, weight: torch.Tensor, compute_dtype=None) -> str:
    """Which path backend ``name`` takes for these inputs, in words (logged once by the head)."""
    kind = str(features.dtype).replace("torch.", "")
    if name == "cpu-c":
        from dsoft_dist.kernels.cpu import cpu_epilogues
        state = "compiled epilogues" if cpu_epilogues() is not None else "no C compiler: torch ops"
        return f"cpu-c ({kind} GEMMs on {features.device.type}, {state})"
    if name in ("torch", "auto") and takes_row_updates(name, features, weight, compute_dtype):
        return f"torch chunked ({kind} GEMMs on {features.device.type})"
    if name in ("triton", "auto"):
        dtype = compute_dtype or min((features.dtype, weight.dtype), key=lambda d: torch.finfo(d).bits)
        return f"triton kernels ({str(dtype).replace('torch.', '')} GEMM operands, fp32 statistics)"
    return f"registered backend {name!r}"
