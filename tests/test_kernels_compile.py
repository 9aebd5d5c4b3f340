"""The triton backend's kernels compile for real GPUs on a machine without one (Triton's bundled ptxas).

Proves what the interpreter cannot: the GPU code generates for sm_90 (H100/H200) and sm_80
(A100), uses tensor-core MMA, fits in shared memory, and (default tiles) barely spills:

    python -m pytest tests/test_kernels_compile.py
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
triton = pytest.importorskip("triton")
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(_TOOLS, "cuobjdump")),
                                reason="this Triton build ships no NVIDIA toolchain")
_MAX_STACK = 64  # bytes of register spill tolerated for the default tiles (measured: 0-16 at D=512)


def _compile(arch, dtype, gather, normalize=True):
    code = ("import json; from dsoft_dist.kernels.compile_check import compile_all, problems; "
            "from dsoft_dist.kernels.config import default_config; "
            f"rows = compile_all(default_config(512, False), 512, {dtype!r}, {arch}, {gather}, {normalize}); "
            "print(json.dumps(dict(rows=rows, problems=problems(rows))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_MORE_TILES = pytest.mark.slow(reason="a Triton compile to PTX and SASS per case (~4-9 s); the default tier keeps the "
                                      "Hopper bf16 gather case")


@pytest.mark.parametrize("arch, dtype, gather, normalize", [
    (90, "bf16", True, True), pytest.param(90, "bf16", False, True, marks=_MORE_TILES),
    pytest.param(90, "fp16", True, False, marks=_MORE_TILES), pytest.param(90, "fp32", False, True, marks=_MORE_TILES),
    pytest.param(80, "bf16", True, True, marks=_MORE_TILES),
])
def test_default_tiles_compile_for_the_gpu(arch, dtype, gather, normalize):
    result = _compile(arch, dtype, gather, normalize)
    fatal, _warnings = result["problems"]
    assert not fatal, fatal
    by_kernel = {r["kernel"]: r for r in result["rows"]}
    assert set(by_kernel) == {"row_norms", "forward", "grad_features", "grad_weight"}
    want_mma = "wgmma" if arch == 90 and dtype != "fp32" else None
    for name in ("forward", "grad_features", "grad_weight"):
        if want_mma:
            assert by_kernel[name]["mma"] == want_mma, by_kernel[name]
        if dtype in ("bf16", "fp16"):
            assert by_kernel[name]["stack_bytes"] <= _MAX_STACK, by_kernel[name]
