"""What a finished run reports: curves.png's figure, report.json's throughput, the verification metric names,
and the training bar (drawn on a terminal only, log lines above it, a log line in its place elsewhere).

The figure is inspected as a matplotlib object (legend labels, axis limits), not as pixels. The runs are
tiny real ones: one rank, in this process (``dsoft_dist.cli.main``), or ``dsoft train`` on a pseudo-terminal.

    python -m pytest tests/test_train_report.py
"""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict, config_to_dict
from dsoft_dist.errors import ConfigError
from dsoft_dist.train.report import write_report
from tests.terminal import DSOFT, on_a_terminal

TINY = {"name": "tiny", "seed": 0,
        "model": {"name": "iresnet_tiny", "embedding_size": 16, "input_size": 16},
        "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
        "data": {"source": "synthetic", "synthetic_mode": "images", "num_classes": 12, "samples_per_class": 4,
                 "image_size": 16, "batch_size": 8, "num_workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "schedule": {"steps": 4, "warmup_steps": 0, "decay": "constant"},
        "parallel": {"nproc": 1, "backend": "gloo"},
        "logging": {"log_every": 2},
        "checkpoint": {"resume": "never"}}


def tiny_config(tmp_path, loss: str = "d_softmax", name: str = "run", **logging) -> str:
    """TINY as a YAML file with its output under tmp_path/<name>; returns the file's path."""
    cfg = json.loads(json.dumps(TINY))
    cfg["head"]["loss"] = loss
    cfg["logging"].update(output_dir=str(tmp_path / name), **logging)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def rows_of(loss_terms: bool, steps=(1, 100, 200, 300, 400)) -> list[dict]:
    extra = (lambda s: {"intra": 1.0 / s, "inter": 2.0 / s}) if loss_terms else (lambda s: {})
    return [{"step": s, "loss": 3.0 / s, "lr": 0.1, "samples_per_s": 50.0, **extra(s)} for s in steps]


def curves_figure(rows: list[dict], evals: list[dict]):
    from dsoft_dist.train.report import curves_figure  # here: a missing function fails its tests, not the file

    return curves_figure(rows, evals)


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


# ----------------------------------------------------------------------------- curves.png


@pytest.mark.parametrize("loss_terms, labels", [(True, ["loss", "intra term", "inter term"]), (False, ["loss"])])
def test_the_loss_legend_names_only_the_terms_the_loss_has(loss_terms, labels):
    """ArcFace's rows have no intra/inter: no legend entry for lines that are not there."""
    fig = curves_figure(rows_of(loss_terms), [{"step": 400, "lfw/accuracy": 0.9}])
    ax_loss, _ = fig.axes
    assert legend_labels(ax_loss) == labels
    assert len(ax_loss.get_lines()) == len(labels)


def test_a_single_verification_sits_on_the_run_step_axis():
    """One verification at step 400 of a 400-step run: its axis spans the run (1..400), not 380..420."""
    fig = curves_figure(rows_of(False), [{"step": 400, "lfw/accuracy": 0.9}])
    _, ax_eval = fig.axes
    lo, hi = ax_eval.get_xlim()
    assert lo <= 1 and hi >= 400 and hi - lo < 2 * 400
    assert legend_labels(ax_eval) == ["lfw/accuracy"]


def test_several_verifications_each_get_a_point_on_the_same_axis():
    evals = [{"step": s, "lfw/accuracy": 0.5 + s / 1000, "pairs/auc": 0.6 + s / 1000} for s in (0, 200, 400)]
    fig = curves_figure(rows_of(True), evals)
    ax_loss, ax_eval = fig.axes
    assert ax_eval.get_xlim() == ax_loss.get_xlim() and ax_eval.get_xlim()[0] <= 0
    assert legend_labels(ax_eval) == ["lfw/accuracy", "pairs/auc"]
    assert [list(line.get_xdata()) for line in ax_eval.get_lines()] == [[0, 200, 400]] * 2


def test_a_run_of_one_step_gets_an_axis_around_it():
    fig = curves_figure(rows_of(False, steps=(7,)), [{"step": 7, "lfw/accuracy": 0.9}])
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert lo < 7 < hi and hi - lo <= 2


# ----------------------------------------------------------------------------- report.json


def summary_of(rows, train_seconds=4.0, world_size=2, **extra) -> dict:
    cfg = config_from_dict({"data": {"batch_size": 16}, "optimizer": {"grad_accum_steps": 2},
                            "schedule": {"steps": rows[-1]["step"]}})
    return {"config": config_to_dict(cfg), "world_size": world_size, "backend": "gloo", "engine": "ddp",
            "train_seconds": train_seconds, "head_step_in_backward": True, "log": rows, "evals": [], "final": {},
            **extra}


def test_report_json_has_the_throughput_of_the_whole_run(tmp_path):
    """samples/s of the run = steps x global batch / train seconds; the last log row's value is one interval's."""
    text = write_report(str(tmp_path), summary_of(rows_of(True)))
    done = json.loads((tmp_path / "report.json").read_text())["throughput"]
    assert done == {"steps": 400, "samples": 400 * 16 * 2 * 2, "seconds": 4.0, "samples_per_s": 400 * 64 / 4.0}
    assert "400 steps in 4.0 s (6400 samples/s)" in text
    # a resumed attempt trained only its own steps in its seconds
    write_report(str(tmp_path), summary_of(rows_of(True), start_step=300))
    done = json.loads((tmp_path / "report.json").read_text())["throughput"]
    assert (done["steps"], done["samples_per_s"]) == (100, 100 * 64 / 4.0)


# ----------------------------------------------------------------------------- metric names


def test_a_set_named_val_logs_val_at_far_not_val_val(tmp_path, monkeypatch, capfd):
    """A real run verifying on val.bin: metrics.jsonl, report.json and report.md name VAL@FAR unambiguously."""
    from dsoft_dist.train.verify import build_synthetic_bin

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = tiny_config(tmp_path)
    cfg = config_from_dict({**yaml.safe_load(open(path)), "eval": {"synthetic_identities": 4, "synthetic_pairs": 20}})
    build_synthetic_bin(cfg, str(tmp_path / "val.bin"))
    assert main(["train", "--config", path, "--set", f"eval.bins=[{tmp_path / 'val.bin'}]",
                 "--set", "checkpoint.keep_best=val/val_at_far"]) == 0
    evals = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r.get("eval")]
    assert set(evals[-1]) == {"step", "time", "eval", "val/accuracy", "val/accuracy_std", "val/threshold",
                              "val/val_at_far"}
    vaf = evals[-1]["val/val_at_far"]
    assert f"VAL {vaf:.3f}" in (tmp_path / "run" / "report.md").read_text()
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "best")  # keep_best found the new name


def test_keep_best_with_the_old_val_spelling_names_the_new_one():
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best='lfw/val'.*use lfw/val_at_far"):
        config_from_dict({"checkpoint": {"keep_best": "lfw/val"}})
    assert config_from_dict({"checkpoint": {"keep_best": "lfw/val_at_far"}}).checkpoint.keep_best == "lfw/val_at_far"


# ----------------------------------------------------------------------------- the training bar


def test_without_a_terminal_a_log_line_stands_in_for_the_bar_with_the_terms_the_loss_has(tmp_path, monkeypatch,
                                                                                          capfd, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level("INFO", logger="dsoft_dist"):
        assert main(["train", "--config", tiny_config(tmp_path, loss="arcface")]) == 0
        assert main(["train", "--config", tiny_config(tmp_path, name="dsoftmax")]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "step/s" not in err  # no bar in a redirected log
    arcface, dsoftmax = [r.getMessage() for r in caplog.records if "step 4/4: loss" in r.getMessage()]
    assert "intra" not in arcface and "nan" not in arcface, arcface  # ArcFace has no intra/inter terms to print
    assert re.search(r"loss \d+\.\d{4} \(intra \d+\.\d{4}, inter \d+\.\d{4}\)", dsoftmax), dsoftmax


def test_on_a_terminal_the_bar_is_drawn_and_log_lines_go_above_it(tmp_path):
    """``dsoft train`` with stderr on a pseudo-terminal: a step bar, no per-step log line (the bar stands in),
    and every log line starts a line of its own (tqdm.write clears the bar first), never glued onto the bar."""
    path = tiny_config(tmp_path, log_every=1)
    cfg = yaml.safe_load(open(path))
    cfg["eval"] = {"synthetic_identities": 4, "synthetic_pairs": 20, "every_steps": 2}  # logs while the bar is open
    open(path, "w").write(yaml.safe_dump(cfg))
    rc, err = on_a_terminal([DSOFT, "train", "--config", path], columns=120,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    assert rc == 0, err[-3000:]
    assert re.search(r"tiny: +\d+%\|.*\| 4/4 ", err), err[-3000:]  # the bar reached the last step
    assert "step 4/4: loss" not in err
    logged = [seg for line in err.replace("\r\n", "\n").split("\n") for seg in [line.split("\r")[-1]]
              if " INFO " in line]
    assert any("synthetic_unseen: accuracy" in seg for seg in logged), err[-3000:]
    glued = [seg for seg in logged if not re.match(r"\d\d:\d\d:\d\d ", seg)]
    assert not glued, glued
