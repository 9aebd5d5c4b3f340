"""`dsoft demo`: the embedded default equals configs/demo.yaml, and a short real run learns."""
import json
from pathlib import Path

import pytest

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict, load_config
from dsoft_dist.demo import DEMO_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_is_configs_demo_yaml():
    assert config_from_dict(DEMO_CONFIG) == load_config(ROOT / "configs" / "demo.yaml")


def test_demo_rejects_bad_override(capsys):
    assert main(["demo", "--set", "head.sample_rate=0"]) == 1
    assert "head.sample_rate=0.0 is invalid" in capsys.readouterr().err


@pytest.mark.slow(reason="the demo's 2 ranks on images for 60 steps, with verification (~12 s)")
@pytest.mark.dist
def test_demo_two_ranks_learns_unseen_identities(tmp_path, capfd):
    """The end-to-end run: 2 gloo ranks, tiny IResNet on synthetic images, verification on unseen identities."""
    out = tmp_path / "demo"
    code = main(["demo", "--set", f"logging.output_dir={out}", "--set", "schedule.steps=60",
                 "--set", "data.num_classes=200", "--set", "logging.progress=false", "--set", "logging.log_every=20"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    first, last = report["log"][0], report["log"][-1]
    assert last["loss"] < first["loss"] and last["target_cos"] > first["target_cos"] + 0.1
    untrained, trained = report["evals"][0], report["evals"][-1]
    assert (untrained["step"], trained["step"]) == (0, 60)
    assert trained["synthetic_unseen/accuracy"] > untrained["synthetic_unseen/accuracy"] + 0.1  # the stated margin
    assert (out / "backbone.pt").is_file() and any((out / "head").iterdir())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 20, 40, 60]
    assert [r["step"] for r in rows if r.get("eval")] == [0, 60]
    timed = rows[1]
    assert all(timed[f"time_{k}"] >= 0 for k in ("data", "backbone", "head", "optimizer"))
    assert {"intra", "inter", "target_cos", "hardest_neg_cos", "lr", "samples_per_s", "memory_mb",
            "bad_samples"} <= set(timed)
    printed = capfd.readouterr()
    assert "Verification (10-fold" in printed.out and "Written to" in printed.out
    assert "\r" not in printed.err  # no progress bar on a redirected stderr
