"""Learning-rate schedule, D-Softmax's inter-weight schedule and the metrics sink."""
import json
import math

import pytest

from dsoft_dist.config import load_config
from dsoft_dist.observability.metrics import MetricsSink
from dsoft_dist.train import inter_weight_at, lr_factor
from tests.test_train_dist import run_each, tiny


def _sched(**kw):
    return load_config(None, [f"schedule.{k}={v}" for k, v in kw.items()]).schedule


def test_warmup_then_cosine():
    s = _sched(steps=110, warmup_steps=10, decay="cosine")
    assert [lr_factor(i, s) for i in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(10, s) == 1.0
    assert lr_factor(60, s) == pytest.approx(0.5)
    assert lr_factor(110, s) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_poly_constant_and_floor():
    s = _sched(steps=100, decay="poly", poly_power=2.0, min_lr_ratio=0.1)
    assert lr_factor(50, s) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(100, s) == pytest.approx(0.1)
    assert lr_factor(37, _sched(steps=100, decay="constant")) == 1.0
    assert lr_factor(500, _sched(steps=100, decay="cosine")) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(lr_factor(0, _sched(steps=1, warmup_steps=1)))


def _head(**kw):
    return load_config(None, [f"head.{k}={v}" for k, v in kw.items()]).head


def test_the_inter_weight_schedule_goes_from_inter_weight_to_inter_weight_end_along_a_half_cosine():
    s = _sched(steps=101, warmup_steps=10)
    constant = _head(inter_weight=0.8, inter_weight_end="null")  # the paper's form
    assert [inter_weight_at(i, constant, s) for i in (0, 50, 100, 500)] == [0.8] * 4
    h = _head(inter_weight=1.0, inter_weight_end=0.25)
    assert inter_weight_at(0, h, s) == 1.0  # the warmup does not shift it
    assert inter_weight_at(50, h, s) == pytest.approx(0.625)
    assert inter_weight_at(100, h, s) == pytest.approx(0.25)
    assert inter_weight_at(500, h, s) == pytest.approx(0.25)  # past the last step (a raised schedule.steps' run)
    values = [inter_weight_at(i, h, s) for i in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert inter_weight_at(0, h, _sched(steps=1)) == 1.0  # one step: the start
    rising = _head(inter_weight=0.5, inter_weight_end=1.0)
    assert inter_weight_at(25, rising, s) == pytest.approx(0.5 + 0.5 * (1 - math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("text, problem", [
    ("head.inter_weight_end=-0.5", "must be >= 0"),
    ("head.loss=arcface,head.inter_weight_end=0.5", "has no intra and inter term")])
def test_a_bad_inter_weight_end_is_refused_naming_the_key(text, problem):
    from dsoft_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=f"head.inter_weight_end=.*{problem}"):
        load_config(None, text.split(","))


@pytest.mark.dist
def test_every_step_of_a_scheduled_run_weights_its_inter_term_by_the_schedule(tmp_path):
    """The loss each step logged is its intra term plus that step's scheduled weight times its inter term (both
    logged as row means over the global batch of 2 gloo ranks); unscheduled, the weight stays inter_weight."""
    scheduled, constant = run_each(
        tiny(tmp_path / "scheduled", head__inter_weight=1.0, head__inter_weight_end=0.2, schedule__steps=5),
        tiny(tmp_path / "constant", head__inter_weight=0.6, head__inter_weight_end=None, schedule__steps=5))
    cfg = load_config(None, ["head.inter_weight=1.0", "head.inter_weight_end=0.2", "schedule.steps=5"])
    for result, weight in ((scheduled, lambda step: inter_weight_at(step, cfg.head, cfg.schedule)),
                           (constant, lambda step: 0.6)):
        rows = [r for r in result["rows"] if "inter" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        for r in rows:  # the row of step n is the update at step n - 1 (from 0)
            assert r["loss"] == pytest.approx(r["intra"] + weight(r["step"] - 1) * r["inter"], rel=1e-5)
    assert inter_weight_at(4, cfg.head, cfg.schedule) == pytest.approx(0.2)  # the last step's weight


def test_metrics_sink_writes_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(str(tmp_path), wandb_mode="offline", project="dsoft-test", config={"a": 1})
    sink.log(1, {"loss": 2.5})
    sink.log(2, {"loss": 2.0})
    sink.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    with pytest.raises(ValueError, match="wandb_mode='cloud'"):
        MetricsSink(str(tmp_path), wandb_mode="cloud")
