"""``logging.tensorboard``: the rows of metrics.jsonl as TensorBoard scalars, read back with TensorBoard's own
EventAccumulator; a resumed run drops the events past its checkpoint as metrics.jsonl drops those rows; a
clear error without the package.

    python -m pytest tests/test_train_tensorboard.py
"""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict
from tests.test_train_report import tiny_config


def scalars_of(out) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under <out>/tensorboard, as TensorBoard shows them."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.fail("tensorboard is missing: pip install -e '.[test]' installs it")

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows_as_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """The same view of metrics.jsonl: every number of every row under its key (not "step", "time", "eval")."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for row in map(json.loads, open(out / "metrics.jsonl")):
        for key, value in row.items():
            if key not in ("step", "time", "eval"):
                tags.setdefault(key, []).append((row["step"], value))
    return tags


def assert_same(tb: dict, rows: dict) -> None:
    assert sorted(tb) == sorted(rows)
    for tag in rows:
        assert [s for s, _ in tb[tag]] == [s for s, _ in rows[tag]], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in rows[tag]], rel=1e-6), tag  # float32 events


def test_a_run_writes_its_metrics_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = tiny_config(tmp_path, tensorboard=True, log_every=1)
    assert main(["train", "--config", path, "--set", "eval.synthetic_identities=4",
                 "--set", "eval.synthetic_pairs=20", "--set", "eval.every_steps=2"]) == 0
    out = tmp_path / "run"
    tb, rows = scalars_of(out), rows_as_scalars(out)
    assert_same(tb, rows)
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4] and [s for s, _ in tb["synthetic_unseen/accuracy"]] == [2, 4]
    assert {"intra", "inter", "lr", "samples_per_s", "synthetic_unseen/val_at_far"} <= set(tb)


def test_a_resumed_run_drops_the_events_past_its_checkpoint(tmp_path, monkeypatch):
    """An attempt trains to step 3, checkpoints, logs steps 4 and 5 and dies; the resumed run trains 4-6 again.
    TensorBoard then shows each step once, the resumed run's, as metrics.jsonl does."""
    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = tiny_config(tmp_path, tensorboard=True, log_every=1)
    cfg = yaml.safe_load(open(path))
    cfg["schedule"]["steps"], cfg["checkpoint"]["resume"] = 6, "auto"
    open(path, "w").write(yaml.safe_dump(cfg))
    with distributed("gloo") as env:
        t = Trainer(config_from_dict(cfg), env)
        t.run_steps(3)
        t.save_checkpoint()
        t.run_steps(2)  # logged, never checkpointed: the crash comes before the next save
        t.close()
    out = tmp_path / "run"
    assert [s for s, _ in scalars_of(out)["loss"]] == [1, 2, 3, 4, 5]
    assert main(["train", "--config", path]) == 0
    tb, rows = scalars_of(out), rows_as_scalars(out)
    assert [s for s, _ in rows["loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same(tb, rows)


def test_without_the_package_the_run_stops_with_the_fix(tmp_path, monkeypatch, capfd):
    """TensorBoard not importable (sys.modules entry None: how Python marks a module that cannot be imported)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["train", "--config", tiny_config(tmp_path, tensorboard=True)]) == 2
    err = capfd.readouterr().err
    assert "logging.tensorboard=true needs TensorBoard" in err and "pip install tensorboard" in err, err
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow(reason="spawns 2 gloo ranks (seconds)")
def test_two_ranks_write_one_event_file_rank_0s(tmp_path):
    from tests.test_train_dist import run, tiny

    cfg = tiny(tmp_path / "run", logging__tensorboard=True)
    run(cfg)
    out = tmp_path / "run"
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert_same(scalars_of(out), rows_as_scalars(out))
