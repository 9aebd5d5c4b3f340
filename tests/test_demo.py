"""`dsoft demo`: the embedded default equals configs/demo.yaml, and a short real run learns."""
import json
import logging
from pathlib import Path

import pytest

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict, load_config
from dsoft_dist.config.demo import DEMO_CONFIG
from dsoft_dist.errors import USER_ERROR_EXIT

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_is_configs_demo_yaml():
    assert config_from_dict(DEMO_CONFIG) == load_config(ROOT / "configs" / "demo.yaml")


def test_demo_rejects_bad_override(capsys):
    assert main(["demo", "--set", "head.sample_rate=0"]) == USER_ERROR_EXIT  # 2, as every user error
    assert "head.sample_rate=0.0 is invalid" in capsys.readouterr().err


class Records(logging.Handler):
    """Keeps the messages the project's loggers emit (their handler writes to the stderr of import time)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_demo_shrunk_below_its_warmup_scales_the_warmup(capsys):
    records = Records()
    logging.getLogger("dsoft_dist").addHandler(records)
    try:
        # the config validates with 10 steps: what stops this demo is the backend, checked after the config
        assert main(["demo", "--set", "schedule.steps=10", "--set", "parallel.backend=nccl"]) == USER_ERROR_EXIT
        assert "parallel.backend='nccl' is invalid for dsoft demo" in capsys.readouterr().err
        from dsoft_dist.config.demo import demo_config

        assert demo_config(["schedule.steps=10"])["schedule"]["warmup_steps"] == 1  # steps // 10
        assert demo_config(["schedule.steps=50"])["schedule"]["warmup_steps"] == 20  # the demo's, when it fits
    finally:
        logging.getLogger("dsoft_dist").removeHandler(records)
    assert sum("warmup scaled to 1" in m for m in records.messages) == 2
    # an explicit warmup is the user's: it stands, and the error says what to set
    assert main(["demo", "--set", "schedule.steps=10", "--set", "schedule.warmup_steps=20"]) == USER_ERROR_EXIT
    assert "set it to at most 10, e.g. --set schedule.warmup_steps=1" in capsys.readouterr().err


def test_demo_help_describes_the_demo(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    description = " ".join(capsys.readouterr().out.split("options:")[0].split())  # argparse wraps lines
    assert "synthetic identities" in description and "dsoft config show demo" in description


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
