"""Learning-rate schedule and the metrics sink."""
import json
import math

import pytest

from dsoft_dist.config import load_config
from dsoft_dist.observability.metrics import MetricsSink
from dsoft_dist.train import lr_factor


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
