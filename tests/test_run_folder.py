"""A run folder holds one run: `dsoft train` refuses starts that would mix two runs, --overwrite replaces
one, a finished run's rerun trains and logs nothing twice, and what it writes is shared alike.

Real runs of `dsoft train` (in this process, one rank, a few steps of a tiny image model with synthetic
verification), copied per test from one finished run.
"""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
import yaml

from dsoft_dist.cli import main

RUN_RECORD = "run.json"

CONFIG = {
    "name": "folder", "seed": 0,
    "model": {"name": "iresnet_tiny", "embedding_size": 16, "input_size": 16},
    "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
    "data": {"source": "synthetic", "synthetic_mode": "images", "num_classes": 20, "samples_per_class": 4,
             "image_size": 16, "batch_size": 8, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "schedule": {"steps": 3, "warmup_steps": 0, "decay": "constant"},
    "parallel": {"nproc": 1, "backend": "gloo"},
    "logging": {"output_dir": "run", "log_every": 1, "progress": False},
    "eval": {"synthetic_identities": 10, "synthetic_pairs": 40, "folds": 2},
    "checkpoint": {"every_steps": 1, "keep_last": 5},
}


@pytest.fixture
def train(capfd, caplog):
    """``dsoft train --config folder.yaml ARGS`` in the current folder: (exit code, stderr and log lines)."""
    def run(*args: str) -> tuple[int, str]:
        caplog.clear()
        rc = main(["train", "--config", "folder.yaml", *args])
        return rc, capfd.readouterr().err + caplog.text
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step D-Softmax run in <tmp>/run (checkpoints at steps 1, 2, 3)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "folder.yaml").write_text(yaml.safe_dump(CONFIG))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--config", "folder.yaml"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def folder(finished, tmp_path, monkeypatch):
    """A copy of the finished run's folder and config; the test runs in it."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _steps(folder) -> list[str]:
    return sorted(p.name for p in (folder / "run" / "checkpoints").glob("step-*"))


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def test_another_loss_into_a_finished_run_is_refused_before_any_rank_starts(folder, train):
    before = (folder / "run" / "report.json").read_bytes()
    rc, err = train("--set", "head.loss=arcface")
    assert rc == 2, err
    assert "holds another run: head.loss: 'd_softmax' -> 'arcface'" in err and "--overwrite" in err, err
    assert "resumed" not in err and "step 1/" not in err  # refused before the run started
    assert (folder / "run" / "report.json").read_bytes() == before


def test_resume_never_into_a_folder_holding_a_run_is_refused(folder, train):
    rc, err = train("--resume", "never")
    assert rc == 2, err
    assert "already holds a run" in err and "step-00000003" in err and "--overwrite" in err, err
    assert _steps(folder) == ["step-00000001", "step-00000002", "step-00000003"]


def test_overwrite_replaces_the_old_run_and_leaves_none_of_its_checkpoints(folder, train):
    rc, err = train("--resume", "never", "--overwrite", "--set", "schedule.steps=2",
                    "--set", "head.loss=arcface")
    assert rc == 0, err
    assert _steps(folder) == ["step-00000001", "step-00000002"]  # the old run's step 3 is gone
    saved = torch.load(folder / "run" / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=True)
    assert saved["config"]["head"]["loss"] == "arcface"
    assert [r["step"] for r in _rows(folder) if "loss" in r] == [1, 2]
    assert json.loads((folder / "run" / RUN_RECORD).read_text())["defining"]["head.loss"] == "arcface"
    # a later auto resume finds this run only
    rc, err = train("--set", "schedule.steps=2", "--set", "head.loss=arcface")
    assert rc == 0 and "resumed from run/checkpoints/step-00000002" in err, err


def test_a_rerun_of_a_finished_run_trains_nothing_and_logs_no_second_verification(folder, train):
    rows = _rows(folder)
    rc, err = train()
    assert rc == 0, err
    assert "already finished (step 3 of 3)" in err, err
    assert _rows(folder) == rows  # no duplicate eval row


def test_more_steps_continue_the_same_run(folder, train):
    rc, err = train("--set", "schedule.steps=4", "--set", "optimizer.lr=0.05")
    assert rc == 0, err
    assert "resumed from run/checkpoints/step-00000003" in err, err
    assert "config changed since the checkpoint: optimizer.lr: 0.1 -> 0.05, schedule.steps: 3 -> 4" in err, err
    assert [r["step"] for r in _rows(folder) if "loss" in r] == [1, 2, 3, 4]


def test_a_d_softmax_checkpoint_from_before_the_presets_resumes_with_a_note_of_what_changed():
    """Such a run trained the paper's constant inter weight: resumed with today's defaults its loss is the
    schedule's from there on, and the resume says so (a resume keeps the run's own config otherwise)."""
    from dsoft_dist.config import config_from_dict
    from dsoft_dist.config.loader import config_to_dict
    from dsoft_dist.train.state import TrainState

    now = config_to_dict(config_from_dict(CONFIG))
    before = {**now, "head": {k: v for k, v in now["head"].items() if k != "inter_weight_end"}}
    before["head"]["end_point"] = 0.9
    state = TrainState(now)
    note = state.load_state_dict({"step": 2, "skipped": 0, "config": before})
    assert note == "config changed since the checkpoint: head.end_point: 0.9 -> 1.0, head.inter_weight_end: None -> 0.0"
    assert state.config == now and state.step == 2
    assert state.load_state_dict({"step": 2, "skipped": 0, "config": now}) is None
    resumed = {**now, "checkpoint": {**now["checkpoint"], "resume": "run/checkpoints/step-00000002"}}
    assert TrainState(resumed).load_state_dict({"step": 2, "skipped": 0, "config": now}) is None  # how it starts


def test_turning_on_activation_checkpointing_continues_the_same_run(folder, train):
    """It changes how the backbone's gradients are computed, not which run it is (the same numbers)."""
    defining = json.loads((folder / "run" / RUN_RECORD).read_text())["defining"]
    assert "model.activation_checkpointing" not in defining and defining["model.name"] == "iresnet_tiny"
    rc, err = train("--set", "schedule.steps=4", "--set", "model.activation_checkpointing=true")
    assert rc == 0, err
    assert "resumed from run/checkpoints/step-00000003" in err and "another run" not in err, err
    assert [r["step"] for r in _rows(folder) if "loss" in r] == [1, 2, 3, 4]


def test_an_explicit_checkpoint_continues_with_another_loss_and_records_it(folder, train):
    rc, err = train("--resume", "run/checkpoints/step-00000002", "--set", "head.loss=arcface")
    assert rc == 0, err
    assert "other defining values: head.loss: 'd_softmax' -> 'arcface'" in err, err
    assert json.loads((folder / "run" / RUN_RECORD).read_text())["defining"]["head.loss"] == "arcface"


def test_a_folder_without_run_json_is_checked_against_its_newest_checkpoint(folder, train):
    (folder / "run" / RUN_RECORD).unlink()  # a run written before run.json existed
    rc, err = train("--set", "head.loss=arcface")
    assert rc == 2 and "head.loss: 'd_softmax' -> 'arcface'" in err, err


def test_the_backbone_file_is_as_readable_as_the_other_outputs(finished):
    mode = stat.S_IMODE(os.stat(finished / "run" / "backbone.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(finished / "run" / "report.md").st_mode)
    assert mode & stat.S_IROTH, oct(mode)


@pytest.mark.parametrize("source", ["run/backbone.pt", "run"])
def test_init_from_takes_a_backbone_file_or_a_run_folder(folder, train, source):
    shutil.move(folder / "run", folder / "old")
    rc, err = train("--init-from", source.replace("run", "old", 1))
    assert rc == 0, err
    assert "initialized from old" in err, err


def test_init_from_a_missing_path_is_refused_before_any_rank_starts(folder, train):
    rc, err = train("--init-from", "nope/backbone.pt", "--set", "logging.output_dir=fresh")
    assert rc == 2 and "checkpoint.init_from='nope/backbone.pt' does not exist" in err, err
    assert not (folder / "fresh").exists()


def test_a_missing_manifest_is_refused_before_any_rank_starts(folder, train):
    rc, err = train("--set", "data.source=webdataset", "--set", "data.manifest=nope/manifest.json",
                    "--set", "eval.synthetic_identities=0", "--set", "logging.output_dir=fresh")
    assert rc == 2 and "manifest 'nope/manifest.json' does not exist" in err, err
    assert not (folder / "fresh").exists()  # nothing started, no empty output folder


def test_checkpoints_are_written_by_time_when_no_step_interval_is_set(folder, train):
    rc, err = train("--set", "logging.output_dir=timed", "--set", "checkpoint.every_steps=0",
                    "--set", "checkpoint.every_minutes=0.000001")
    assert rc == 0, err
    assert sorted(p.name for p in (folder / "timed" / "checkpoints").glob("step-*")) == \
        ["step-00000001", "step-00000002", "step-00000003"]


def test_the_default_checkpoint_interval_saves_work():
    from dsoft_dist.config.schema import CheckpointConfig

    assert CheckpointConfig().every_minutes > 0
