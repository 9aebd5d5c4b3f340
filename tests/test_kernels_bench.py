"""The kernel benchmark's code paths run end to end: --smoke on CPU (Triton interpreter), refusal without CUDA.

    python -m pytest tests/test_kernels_bench.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton decides interpreter vs compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


def _run(args, tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "dsoft_dist.bench.kernels", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU path; the GPU check runs the real sizes")
def test_smoke_writes_every_case_and_the_sweep(tmp_path):
    out = tmp_path / "kernels.json"
    proc = _run(["--smoke", "--sweep", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    methods = {(c["method"], c["rate"]) for c in result["cases"]}
    assert methods == {(m, r) for m in ("triton", "torch", "naive") for r in (1.0, 0.25)}
    for case in result["cases"]:
        assert case["seconds"] > 0 and case["model_eff"] > 0 and case["k"] == (300 if case["rate"] == 1.0 else 75)
    assert len(result["sweep"]) == 4 and all("seconds" in row for row in result["sweep"])
    assert result["config"] is not None and result["torch"] == torch.__version__
    assert "speedup triton vs torch, full B=48 C_local=300" in proc.stdout
    report = subprocess.run([sys.executable, "-m", "dsoft_dist.bench.kernels_report", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "- B=48 C_local=300: speedup vs torch" in report.stdout and "## Benchmark table" in report.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_unless_smoke(tmp_path):
    proc = _run(["--classes", "1000"], tmp_path)
    assert proc.returncode == 2
    assert "the kernel benchmark needs a CUDA GPU (none found); use --smoke" in proc.stderr
