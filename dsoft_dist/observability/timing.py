"""Device timing: wait for queued work, and the GEMM rate of the head's step shapes (``dsoft plan`` and ``dsoft bench``).

    sync_device(device)                                  # before and after a timed region (CUDA)
    gflops = matmul_rate(batch, dim, k, device, class_major=True)
"""
from __future__ import annotations

import statistics
import time

import torch


def sync_device(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); a no-op on CPU. Timings bracket it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(batch, dim, k, device, class_major, repeats=5) -> float:
    """GFLOP/s of the step's three GEMM shapes on one chunk of k rows, plain torch.mm: 6 B k D / median time.

    class_major: (k,D)x(D,B), (B,k)x(k,D) from a (k,B) block, (k,B)x(B,D); else their
    transposes (B,D)x(D,k), (B,k)x(k,D), (k,B)x(B,D) from a (B,k) block.
    """
    f, w = torch.randn(batch, dim, device=device), torch.randn(k, dim, device=device)
    g = torch.randn(k, batch, device=device) if class_major else torch.randn(batch, k, device=device)
    g_bk = g.t() if class_major else g  # (B, k) view
    times = []
    for _ in range(repeats + 1):
        sync_device(device)
        t0 = time.perf_counter()
        torch.mm(w, f.t()) if class_major else torch.mm(f, w.t())
        torch.mm(g_bk, w)
        torch.mm(g_bk.t(), f)
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return 6 * batch * k * dim / statistics.median(times[1:]) / 1e9
