"""The head does not need dsoft_dist.kernels: kernels are a backend it imports only when selected.

Each check runs in a fresh interpreter whose import system refuses ``dsoft_dist.kernels``
(a meta-path finder that raises ImportError), so an import anywhere on the head's CPU path
would fail the run. Also: ``kernels/`` imports nothing from ``dsoft_dist.head`` or
``dsoft_dist.bench`` (read from its source files).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
_BLOCK = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "dsoft_dist.kernels" or name.startswith("dsoft_dist.kernels."):
            raise ImportError(f"{name} is made unimportable by the test")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DSOFT_HEAD_BACKEND", None)
    return subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True, timeout=300, env=env)


def test_the_head_builds_trains_and_steps_without_the_kernels_package():
    out = _run("""
import torch
import dsoft_dist, dsoft_dist.head
from dsoft_dist.config.schema import HeadConfig, OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer
for negatives in ("all", "random"):
    head = ShardedClassifier.from_config(HeadConfig(negatives=negatives, sample_rate=0.1), 500, 16)
    build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, head_step_in_backward=True))
    for _ in range(2):
        head(torch.randn(8, 16, requires_grad=True), torch.randint(0, 500, (8,))).backward()
assert "dsoft_dist.kernels" not in sys.modules
print("OK", sorted(m for m in sys.modules if m.startswith("dsoft_dist.kernels")))
""")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK []" in out.stdout


def test_selecting_a_kernel_backend_is_what_imports_the_kernels():
    """The guard is real: the cpu-c backend needs dsoft_dist.kernels, so the same run with it fails."""
    out = _run("""
import torch
from dsoft_dist.head import ShardedClassifier
head = ShardedClassifier(500, 16, backend="cpu-c")
head(torch.randn(8, 16, requires_grad=True), torch.randint(0, 500, (8,))).backward()
""")
    assert out.returncode != 0 and "dsoft_dist.kernels is made unimportable by the test" in out.stderr


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_from_head_or_bench(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    bad = [n for n in names if n.startswith(("dsoft_dist.head", "dsoft_dist.bench", "dsoft_dist.train"))]
    assert not bad, f"{path.name} imports {bad}"
