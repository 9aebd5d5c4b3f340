"""Input checks of the triton backend: every error says what, the value, and the fix.

Checks are O(1) metadata reads (shapes, dtypes, devices, strides): no host sync, so nothing
here reads tensor values (the head validates labels once per step, ``dsoft_dist.head.checks``).
"""
from __future__ import annotations

import math

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FIX = "or use backend='torch' (the reference path takes any dtype and device)"


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_shard_inputs(features, weight, rows, target_local, valid, scale, interpreted: bool) -> None:
    """Raises ValueError unless the inputs fit the kernels; see ``triton_local_shard_stats`` for shapes."""
    _need(features.dim() == 2, f"features must be 2-D (B, D), got shape {tuple(features.shape)}")
    _need(weight.dim() == 2 and weight.shape[1] == features.shape[1],
          f"weight must be (C_local, D={features.shape[1]}), got shape {tuple(weight.shape)}")
    for name, t in (("features", features), ("weight", weight)):
        _need(t.dtype in TRITON_DTYPES, f"{name} dtype {t.dtype} is not supported by the triton kernels; "
              f"use float32, float16 or bfloat16 {_FIX}")
    device = features.device
    _need(device.type == "cuda" or (device.type == "cpu" and interpreted),
          f"the triton kernels got tensors on {device}: they run on CUDA, or on CPU only in Triton's interpreter "
          f"(set TRITON_INTERPRET=1 before the kernels are first imported) {_FIX}")
    batch = features.shape[0]
    named = [("weight", weight), ("target_local", target_local), ("valid", valid)]
    if rows is not None:
        named.append(("rows", rows))
    for name, t in named:
        _need(t.device == device, f"{name} is on {t.device} but features are on {device}; move them to one device")
    _need(weight.shape[0] == 0 or weight.stride(1) == 1,
          f"weight rows must be contiguous (stride(1) == 1), got strides {weight.stride()}; pass weight.contiguous()")
    _need(target_local.dtype == torch.int64 and tuple(target_local.shape) == (batch,),
          f"target_local must be int64 of shape ({batch},), got {target_local.dtype} {tuple(target_local.shape)}")
    _need(valid.dtype == torch.bool and tuple(valid.shape) == (batch,),
          f"valid must be bool of shape ({batch},), got {valid.dtype} {tuple(valid.shape)}")
    if rows is not None:
        _need(rows.dtype == torch.int64 and rows.dim() == 1,
              f"rows must be a 1-D int64 tensor of sorted unique local row ids (or None), "
              f"got {rows.dtype} of shape {tuple(rows.shape)}")
    _need(isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0,
          f"scale={scale!r} is invalid: must be a finite number > 0 (e.g. 64.0)")
