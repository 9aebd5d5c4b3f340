"""The triton backend's kernels compiled on a CUDA GPU: bf16/fp16/fp32 at larger shapes, tile configs, memory.

Skipped without CUDA (the interpreter tests in test_kernels_shard_stats.py cover the math on CPU).
Run by ``launch/gpu_check.sh``:

    python -m pytest -m gpu tests/test_kernels_gpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton decides interpreter vs compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton = pytest.importorskip("triton")

from dsoft_dist.kernels import KernelConfig, triton_local_shard_stats  # noqa: E402
from dsoft_dist.kernels.config import SWEEP_CONFIGS  # noqa: E402

from dsoft_dist.head import ShardedClassifier  # noqa: E402
from dsoft_dist.head import local as head_local  # noqa: E402

SCALE = 64.0
# (dtype, stats atol, gradient tol relative to the largest entry)
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-3, 3e-2)]


def _case(batch, classes, dim, dtype, rate, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen, device="cuda"), dim=1).to(dtype)
    weight = (torch.randn(classes, dim, generator=gen, device="cuda") * 0.01).to(dtype)
    target = torch.randint(0, classes, (batch,), generator=gen, device="cuda")
    target[::7] = -1
    valid = torch.ones(batch, dtype=torch.bool, device="cuda")
    valid[::11] = False
    rows = None
    if rate < 1:
        rows = torch.randperm(classes, generator=gen, device="cuda")[: int(rate * classes)]
        rows = torch.unique(torch.cat([rows, target[target >= 0][:5]]))  # some owned targets among them
    return feats, weight, rows, target, valid


def _dense(feats, weight, rows, target, valid):
    f, w = feats.double().requires_grad_(True), weight.double().requires_grad_(True)
    cos = f @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).t()
    cols = torch.arange(w.shape[0], device="cuda")
    keep = (torch.ones_like(cols, dtype=torch.bool) if rows is None else torch.isin(cols, rows))[None, :]
    keep = keep & (cols[None, :] != target[:, None]) & valid[:, None]
    lse = torch.logsumexp(torch.where(keep, SCALE * cos, float("-inf")), dim=1)
    tgt = torch.where(target >= 0, cos.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0)
    return f, w, lse, tgt


def _grads(fn, feats, weight, rows, target, valid, **kw):
    f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lse, tgt, _ = fn(f, w, rows, target, valid, SCALE, True, **kw)
    (torch.where(torch.isfinite(lse), lse, 0.0).sum() + 3.0 * tgt.sum()).backward()
    return lse, tgt, f.grad, (w.grad.to_dense() if w.grad.is_sparse else w.grad)


def _close(name, got, want, tol):
    scale = max(1.0, want.abs().nan_to_num(neginf=0.0).max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rate", [1.0, 0.05])
@pytest.mark.parametrize("dtype, stat_tol, grad_tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_kernels_match_dense_float64(dtype, stat_tol, grad_tol, rate):
    feats, weight, rows, target, valid = _case(509, 20011, 512, dtype, rate)
    lse, tgt, gf, gw = _grads(triton_local_shard_stats, feats, weight, rows, target, valid)
    f, w, ref_lse, ref_tgt = _dense(feats, weight, rows, target, valid)
    (torch.where(torch.isfinite(ref_lse), ref_lse, 0.0).sum() + 3.0 * ref_tgt.sum()).backward()
    for name, a, b, tol in (("lse", lse, ref_lse, stat_tol), ("target", tgt, ref_tgt, stat_tol),
                            ("grad features", gf, f.grad, grad_tol), ("grad weight", gw, w.grad, grad_tol)):
        _close(name, a, b.detach(), tol)


@pytest.mark.parametrize("index", range(len(SWEEP_CONFIGS)))
def test_every_benchmark_config_compiles_and_matches(index):
    feats, weight, rows, target, valid = _case(300, 5000, 512, torch.bfloat16, 1.0)
    base = _grads(triton_local_shard_stats, feats, weight, rows, target, valid)
    got = _grads(triton_local_shard_stats, feats, weight, rows, target, valid, config=KernelConfig(**SWEEP_CONFIGS[index]))
    for name, a, b in zip(("lse", "target", "grad features", "grad weight"), got, base):
        _close(name, a, b, 3e-2)


def test_triton_step_holds_no_logit_matrix():
    """Transient memory of a full-head step is far below one (B, C) bf16 logit matrix."""
    batch, classes, dim = 4096, 100_000, 512
    feats, weight, rows, target, valid = _case(batch, classes, dim, torch.bfloat16, 1.0)
    _grads(triton_local_shard_stats, feats, weight, rows, target, valid)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _grads(triton_local_shard_stats, feats, weight, rows, target, valid)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base
    grad_w_bytes, logit_bytes = classes * dim * 2, batch * classes * 2
    assert transient < grad_w_bytes + logit_bytes // 4, (transient, grad_w_bytes, logit_bytes)


@pytest.mark.parametrize("negatives", ["all", "random"])
@pytest.mark.parametrize("loss", ["d_softmax", "arcface"])
def test_head_on_cuda_triton_equals_torch(monkeypatch, loss, negatives):
    emb = torch.randn(256, 128, device="cuda")
    labels = torch.randint(0, 10_000, (256,), device="cuda")
    out = []
    for backend in ("triton", "torch"):
        head = ShardedClassifier(10_000, 128, loss=loss, negatives=negatives, sample_rate=0.1, backend=backend,
                                 device="cuda")
        e = emb.clone().requires_grad_(True)
        value = head(e, labels)
        value.backward()
        out.append((value.detach(), e.grad, head.weight.grad.to_dense() if head.weight.grad.is_sparse
                    else head.weight.grad))
    for a, b in zip(*out):
        _close("head", a, b, 1e-3)


def test_auto_picks_the_kernels_for_16_bit_operands_and_torch_for_plain_fp32():
    from dsoft_dist.head.backend import auto_local_shard_stats
    feats, weight, rows, target, valid = _case(64, 3000, 128, torch.float32, 1.0)
    args = (rows, target, valid, SCALE, True)
    bf16 = weight.to(torch.bfloat16)
    assert torch.equal(auto_local_shard_stats(feats, bf16, *args)[0], triton_local_shard_stats(feats, bf16, *args)[0])
    torch_lse = head_local.torch_local_shard_stats(feats, weight, *args)[0]
    assert torch.equal(auto_local_shard_stats(feats, weight, *args)[0], torch_lse)


def test_head_compute_dtype_bf16_takes_the_triton_backend_on_fp32_inputs(caplog):
    """head.compute_dtype=bf16 (what the GPU configs set): fp32 weights and embeddings still run the kernels."""
    from dsoft_dist.head.backend import describe_local_path

    emb = torch.randn(64, 128, device="cuda")
    labels = torch.randint(0, 3000, (64,), device="cuda")
    head = ShardedClassifier(3000, 128, compute_dtype=torch.bfloat16, device="cuda")
    assert head.backend == "auto"
    assert describe_local_path(head.backend, emb, head.weight, torch.bfloat16).startswith("triton kernels")
    ref = ShardedClassifier(3000, 128, backend="torch", device="cuda")
    with caplog.at_level("INFO", logger="dsoft_dist"):
        got = head(emb, labels)
    assert "triton kernels (bfloat16" in caplog.text
    _close("bf16 head loss", got.detach(), ref(emb, labels).detach(), 3e-2)


@pytest.mark.parametrize("backend,dtype,negatives", [("torch", torch.float32, "all"), ("torch", torch.float32, "random"),
                                                   ("auto", torch.bfloat16, "all")])
def test_a_steady_head_step_does_not_synchronize(backend, dtype, negatives):
    """torch.cuda.set_sync_debug_mode("error") raises on any host sync in the second step (the CPU twin:
    tests/test_head_host_sync.py). The Triton path's sampled modes sync once (unique of rows + targets)."""
    from dsoft_dist.config.schema import OptimizerConfig
    from dsoft_dist.head import build_head_optimizer

    head = ShardedClassifier(5000, 128, negatives=negatives, sample_rate=0.1, backend=backend, device="cuda",
                             dtype=dtype, logit_cache_mb=4.0)
    build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, head_step_in_backward=True))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(2):
        emb = torch.randn(64, 128, device="cuda", generator=gen, dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, 5000, (64,), device="cuda", generator=gen)
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            head(emb, labels).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(head.weight).all()
