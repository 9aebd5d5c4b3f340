"""ShardedClassifier with backend='triton' equals backend='torch' (single process, world size 1), and backend plumbing.

Without a GPU the kernels run in Triton's CPU interpreter (set below, before Triton loads):

    python -m pytest tests/test_kernels_head.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dsoft_dist.kernels import KernelConfig, triton_local_shard_stats  # noqa: E402

import dsoft_dist.head.local as head_local  # noqa: E402
from dsoft_dist.head import ShardedClassifier  # noqa: E402
from dsoft_dist.head.backend import auto_local_shard_stats, requested_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C, D, B = 300, 40, 24


def _data(step):
    gen = torch.Generator().manual_seed(step)
    emb, labels = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
    labels[2], labels[3], labels[4] = -1, 0, C - 1  # an ignored row and both edge classes of the shard
    return emb.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("negatives", ["all", "random"])
@pytest.mark.parametrize("loss", ["d_softmax", "arcface", "cosface", "softmax"])
def test_triton_head_equals_torch_head_over_steps(loss, negatives):
    """Loss, embedding gradient and weight gradient agree over 2 training steps (same sampled rows)."""
    heads = [ShardedClassifier(C, D, loss=loss, negatives=negatives, sample_rate=0.2, seed=3, backend=name,
                               device=DEVICE) for name in ("triton", "torch")]
    assert heads[0].backend == "triton"
    for step in range(2):
        emb, labels = _data(step)
        results = []
        for head in heads:
            e = emb.clone().requires_grad_(True)
            value = head(e, labels)
            value.backward()
            grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
            results.append((value.detach(), e.grad, grad_w, head.diagnostics()))
            head.weight.grad = None
        (lf, ef, wf, df), (lt, et, wt, dt) = results
        torch.testing.assert_close(lf, lt, rtol=1e-5, atol=1e-5)
        for got, want in ((ef, et), (wf, wt)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))
        assert df == pytest.approx(dt, rel=1e-4, abs=1e-5)


def test_requested_backend_reads_the_env_var(monkeypatch):
    monkeypatch.delenv("DSOFT_HEAD_BACKEND", raising=False)
    assert requested_backend("auto") == "auto"
    monkeypatch.setenv("DSOFT_HEAD_BACKEND", "torch")
    assert requested_backend("auto") == "torch"
    monkeypatch.setenv("DSOFT_HEAD_BACKEND", " Triton ")
    assert requested_backend("torch") == "triton"
    monkeypatch.setenv("DSOFT_HEAD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DSOFT_HEAD_BACKEND='cuda' is invalid; use one of auto, torch, cpu-c, triton"):
        requested_backend()


def test_auto_uses_the_torch_path_for_float64_and_the_kernels_reject_it():
    feats = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    args = (None, torch.tensor([1, -1, 3, 9]), torch.ones(4, dtype=torch.bool), 8.0, True)
    want = head_local.torch_local_shard_stats(feats, weight, *args)
    for got, ref in zip(auto_local_shard_stats(feats, weight, *args), want):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="features dtype torch.float64 is not supported by the triton kernels"):
        triton_local_shard_stats(feats, weight, *args)


def _good_args():
    return [torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), None,
            torch.tensor([1, -1, 3, 9], device=DEVICE), torch.ones(4, dtype=torch.bool, device=DEVICE), 8.0, True]


@pytest.mark.parametrize("index, value, match", [
    (1, lambda: torch.randn(10, 7), r"weight must be \(C_local, D=8\), got shape \(10, 7\)"),
    (1, lambda: torch.randn(8, 10).t(), r"weight rows must be contiguous \(stride\(1\) == 1\)"),
    (3, lambda: torch.tensor([1, -1, 3, 9], dtype=torch.int32), "target_local must be int64 of shape"),
    (4, lambda: torch.ones(3, dtype=torch.bool), r"valid must be bool of shape \(4,\)"),
    (2, lambda: torch.tensor([1, 2], dtype=torch.int32), "rows must be a 1-D int64 tensor"),
    (5, lambda: 0.0, "scale=0.0 is invalid"),
])
def test_bad_inputs_raise_clear_errors(index, value, match):
    args = _good_args()
    new = value()
    args[index] = new.to(DEVICE) if isinstance(new, torch.Tensor) else new
    with pytest.raises(ValueError, match=match):
        triton_local_shard_stats(*args)


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="KernelConfig.block_n=48 is invalid: must be a power of two >= 16"):
        KernelConfig(block_n=48)
    with pytest.raises(ValueError, match="config must be a dsoft_dist.kernels.KernelConfig"):
        triton_local_shard_stats(*_good_args(), config={"block_m": 32})


def test_package_imports_and_falls_back_without_triton():
    """With `import triton` failing, dsoft_dist.kernels imports, auto runs the torch path, triton raises clearly."""
    code = "\n".join([
        "import sys; sys.modules['triton'] = None",  # makes `import triton` raise ImportError
        "import torch, dsoft_dist.kernels as k",
        "from dsoft_dist.head.backend import auto_local_shard_stats",
        "assert not k.triton_available()",
        "f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1); w = torch.randn(10, 8)",
        "args = (f, w, None, torch.tensor([1, -1, 3, 9]), torch.ones(4, dtype=torch.bool), 8.0, True)",
        "lse, tgt, mx = auto_local_shard_stats(*args); assert lse.shape == (4,)",
        "try:\n    k.triton_local_shard_stats(*args)\nexcept RuntimeError as e:\n    print('ERR', e)",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR the head's triton backend needs Triton" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the example is the CPU (interpreter) one")
def test_docs_example_runs():
    """The python example in docs/kernels.md runs as written (in the interpreter without a GPU)."""
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks, "docs/kernels.md lost its python example"
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {"__name__": "docs_kernels"})
