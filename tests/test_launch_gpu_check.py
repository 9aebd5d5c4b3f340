"""launch/gpu_check.sh runs end to end and writes its report (without a GPU its GPU stages skip or refuse)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(reason="runs the whole GPU check script on the CPU (~20 s)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the script itself (it takes minutes)")
def test_gpu_check_script_writes_a_report_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = (out / "stages.txt").read_text()
    for stage in ("pytest-gpu rc=0", "compile-check rc=", "pytest-compiled rc=0", "total seconds"):
        assert stage in stages, stages
    assert "bench rc=2" in stages  # the kernel benchmark refuses to time anything without CUDA
    assert "head rc=2" in stages  # so does the head step on --device cuda
    assert "train rc=2" in stages  # and the trainer asked for nccl
    assert "speedup rc=2" in stages  # and the speedup table on --device cuda
    assert "plan rc=2" in stages  # and dsoft plan --measure-profile on --device cuda
    assert "backbone rc=2" in stages  # and dsoft bench backbone on --device cuda
    report = (out / "report.md").read_text()
    assert "gpu: NONE" in report and "## GPU tests" in report
    assert re.search(r"0 passed, 0 failed/errors, [1-9]\d* skipped", report)  # every GPU test skipped
