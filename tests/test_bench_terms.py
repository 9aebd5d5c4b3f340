"""``dsoft bench terms``: the per-row measurements against closed forms on a planted cosine matrix, the
measured samples against the training stream, a tiny ``dsoft train`` run measured end to end, and the
refusals (exit 2) of a folder without checkpoints and of a run whose head is not a cosine head.

    python -m pytest -q tests/test_bench_terms.py
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from dsoft_dist.bench import terms
from dsoft_dist.cli import main
from dsoft_dist.errors import USER_ERROR_EXIT

S, D, W = 16.0, 0.75, 0.5
ST = terms.LossSettings(scale=S, end_point=D, inter_weight=W)
# rows: labels 0, 2, 3, 4; hardest negatives 0.5 (class 2), 0.97 (class 0, above its own target), 0.65
# (class 4), 0.3 (class 3); z_y > d in rows 0 and 3
COS = torch.tensor([[0.80, 0.30, 0.50, -0.20, 0.10],
                    [0.97, 0.20, 0.10, 0.00, 0.40],
                    [0.30, 0.60, 0.20, 0.70, 0.65],
                    [0.00, 0.10, 0.20, 0.30, 0.92]], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 3, 4])
HARDEST = [2, 0, 4, 3]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def negatives_lse(row: int) -> float:
    z = COS[row].numpy()
    neg = np.delete(z, int(LABELS[row])) * S
    return float(np.log(np.exp(neg).sum()))


def arcface_parts(z_y: float, lse: float, m: float = 0.5):
    """psi = cos(theta + m), d psi / dz and p_y = e^{s psi} / (e^{s psi} + e^{LSE}) of a target cosine."""
    theta = math.acos(z_y)
    psi = math.cos(theta + m)
    dpsi = math.cos(m) + math.sin(m) * z_y / math.sqrt(1.0 - z_y * z_y)
    return psi, dpsi, sigmoid(S * psi - lse)


# ----------------------------------------------------------------------------- per-row measurements


def test_hardest_negative_excludes_the_target_and_saturation_counts_rows_past_d():
    z_y, z_h, h = terms.hardest_negative(COS, LABELS)
    assert h.tolist() == HARDEST
    assert z_y.tolist() == [0.80, 0.10, 0.70, 0.92] and z_h.tolist() == [0.50, 0.97, 0.65, 0.30]
    rows = terms.measure_rows(COS, LABELS, ST)
    assert rows["saturated"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert terms.summarize(rows)["saturated"] == 0.5
    gap = [math.degrees(math.acos(zh) - math.acos(zy)) for zy, zh in zip(z_y.tolist(), z_h.tolist())]
    assert rows["gap_deg"].tolist() == pytest.approx(gap, abs=1e-9)
    assert rows["lse_neg"].tolist() == pytest.approx([negatives_lse(i) for i in range(4)], abs=1e-12)


def test_d_softmax_gradients_match_their_closed_forms():
    grads = terms.row_gradients(COS, LABELS, torch.tensor(HARDEST), ST)
    z_y = COS.gather(1, LABELS[:, None])[:, 0].numpy()
    z_h = COS.gather(1, torch.tensor(HARDEST)[:, None])[:, 0].numpy()
    lse = np.array([negatives_lse(i) for i in range(4)])
    intra_y = -S * sigmoid(S * (D - z_y))  # d/dz_y softplus(s (d - z_y))
    inter_h = W * S * sigmoid(lse) * np.exp(S * z_h - lse)  # w s sigmoid(LSE) softmax_h
    assert grads["intra"][0].numpy() == pytest.approx(intra_y, rel=1e-12)
    assert grads["inter"][1].numpy() == pytest.approx(inter_h, rel=1e-12)
    assert grads["intra"][1].abs().max() == 0 and grads["inter"][0].abs().max() == 0  # each term sees one side
    assert grads["d_softmax"][0].numpy() == pytest.approx(intra_y, rel=1e-12)
    assert grads["d_softmax"][1].numpy() == pytest.approx(inter_h, rel=1e-12)
    rows = terms.measure_rows(COS, LABELS, ST)
    assert rows["grad_y/intra"].numpy() == pytest.approx(-intra_y, rel=1e-12)  # magnitudes
    assert rows["grad_h/inter"].numpy() == pytest.approx(inter_h, rel=1e-12)


def test_arcface_gradients_match_their_closed_forms():
    grads = terms.row_gradients(COS, LABELS, torch.tensor(HARDEST), ST)
    for i in range(4):
        z_y, z_h, lse = float(COS[i, LABELS[i]]), float(COS[i, HARDEST[i]]), negatives_lse(i)
        psi, dpsi, p_y = arcface_parts(z_y, lse)
        assert float(grads["arcface"][0][i]) == pytest.approx(-S * (1 - p_y) * dpsi, rel=1e-10)
        p_h = math.exp(S * z_h) / (math.exp(S * psi) + math.exp(lse))
        assert float(grads["arcface"][1][i]) == pytest.approx(S * p_h, rel=1e-10)
    assert "trained" not in grads  # the run's loss is ArcFace or D-Softmax: nothing more to measure
    cosface = terms.LossSettings(S, D, W, trained=(1.0, 0.0, 0.35))
    g = terms.row_gradients(COS, LABELS, torch.tensor(HARDEST), cosface)["trained"][0]
    z_y = COS.gather(1, LABELS[:, None])[:, 0]
    lse = torch.tensor([negatives_lse(i) for i in range(4)], dtype=torch.float64)
    p_y = torch.sigmoid(S * (z_y - 0.35) - lse)
    assert g.tolist() == pytest.approx((-S * (1 - p_y)).tolist(), rel=1e-10)  # CosFace: d psi / dz = 1


def test_d_softmax_effective_margin_is_its_closed_form_and_caps_where_z_star_passes_1():
    rows = terms.measure_rows(COS, LABELS, ST)
    for i in range(4):
        z_h = float(COS[i, HARDEST[i]])
        sig = sigmoid(S * (D - z_h))
        z_star = D - math.log(sig / (2 - sig)) / S  # s sigma(s (d - z*)) = s sigma(s (d - z_h)) / 2
        capped = z_star > 1  # row 1: z_h = 0.97 is past d, so z* = z_h + about log(2) / s > 1
        want = math.degrees(math.acos(z_h)) - (0.0 if capped else math.degrees(math.acos(z_star)))
        assert float(rows["margin_deg/d_softmax"][i]) == pytest.approx(want, abs=1e-6)
        assert float(rows["margin_capped/d_softmax"][i]) == float(capped)
    assert rows["margin_capped/d_softmax"].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_arcface_effective_margin_matches_a_dense_scan_of_its_closed_form_gradient():
    rows = terms.measure_rows(COS, LABELS, ST)
    for i in range(4):
        z_h, lse = float(COS[i, HARDEST[i]]), negatives_lse(i)
        t = np.linspace(z_h, 1 - 1e-9, 400_001)
        theta = np.arccos(t)
        psi = np.cos(theta + 0.5)
        g = S * (1 - sigmoid(S * psi - lse)) * (math.cos(0.5) + math.sin(0.5) * t / np.sqrt(1 - t * t))
        below = np.nonzero(g <= g[0] / 2)[0]
        capped = len(below) == 0  # row 1: theta_h = 14 deg < m = 28.6 deg, the target can never win
        z_star = 1.0 if capped else t[below[0]]
        want = math.degrees(math.acos(z_h) - math.acos(z_star))
        assert float(rows["margin_deg/arcface"][i]) == pytest.approx(want, abs=2e-3)
        assert float(rows["margin_capped/arcface"][i]) == float(capped)
    assert rows["margin_capped/arcface"].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_blocks_of_rows_give_the_same_measurements_as_one_block(monkeypatch):
    whole = terms.measure_rows(COS, LABELS, ST)
    monkeypatch.setattr(terms, "BLOCK", 2 * COS.shape[1])  # two rows per block
    parts = terms.measure_cosines(COS, LABELS, ST)
    assert sorted(parts) == sorted(whole)
    for key in whole:
        assert torch.equal(parts[key], whole[key]), key


def test_summaries_and_the_class_weight_spread():
    stats = terms.summarize({"z_y": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), "saturated": torch.tensor([1.0, 0, 0, 1])})
    assert stats["z_y"] == {"mean": 2.0, "q25": 1.0, "median": 2.0, "q75": 3.0} and stats["saturated"] == 0.5
    # unit rows e1, e1 (scaled), e2, -e2: pair cosines 1, 0, 0, 0, 0, -1; nearest-class cosines 1, 1, 0, 0
    w = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -1.0]])
    assert terms.weight_spread(w) == {"mean_cos": pytest.approx(0.0, abs=1e-12), "mean_max_cos": 0.5,
                                      "classes_measured": 4}
    sub = terms.weight_spread(w, max_rows=2)
    assert sub["classes_measured"] == 2 and sub["mean_cos"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- the measured samples


def test_synthetic_samples_are_the_first_the_training_stream_draws():
    from dsoft_dist.config.schema import DataConfig
    from dsoft_dist.data.datasets import Slot, SyntheticVectorStream
    from dsoft_dist.data.synthetic import vector_difficulty

    data = DataConfig(source="synthetic", synthetic_mode="vectors", num_classes=7, samples_per_class=9,
                      vector_dim=12, seed=3, num_workers=0)
    x, y = terms.training_samples(data, 40)
    stream = SyntheticVectorStream(7, 9, 12, Slot(seed=3), chunk=40, **vector_difficulty("medium"))
    first = next(iter(stream))
    assert np.array_equal(y, first.labels.numpy()) and np.array_equal(x, first.images.numpy())
    x_all, y_all = terms.training_samples(data, 1000)  # more than an epoch holds: the whole epoch, once
    assert len(y_all) == 63 and np.bincount(y_all).tolist() == [9] * 7


@pytest.mark.parametrize("mode", ["images", "glyphs"])
def test_synthetic_images_are_the_stream_images_without_augmentation(mode):
    from dsoft_dist.config.schema import DataConfig
    from dsoft_dist.data.datasets import Slot, SyntheticImageStream

    data = DataConfig(source="synthetic", synthetic_mode=mode, num_classes=5, samples_per_class=3,
                      image_size=16, seed=1, num_workers=0, augment_flip=True)
    x, y = terms.training_samples(data, 4)
    stream = SyntheticImageStream(5, 3, 16, Slot(seed=1), chunk=4, glyphs=mode == "glyphs")  # augment=None
    first = next(iter(stream))
    assert x.dtype == np.uint8 and x.shape == (4, 16, 16, 3)
    assert np.array_equal(y, first.labels.numpy()) and np.array_equal(x, first.images.numpy())


def test_other_sources_give_the_first_samples_of_the_run_loader(tmp_path):
    from dsoft_dist.config.schema import DataConfig
    from dsoft_dist.data.synthetic import SyntheticVectors
    from dsoft_dist.data.vectors import synth_vectors_to_shards

    synth_vectors_to_shards(str(tmp_path), 6, 4, dim=8, per_shard=10, progress=False)
    data = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=6, batch_size=4, vector_dim=8,
                      num_workers=2, shuffle_buffer=8)
    x, y = terms.training_samples(data, 10)
    assert tuple(x.shape) == (10, 8) and y.dtype == np.int64 and len(y) == 10
    truth = SyntheticVectors(6, dim=8, seed=0)
    for vec, label in zip(x.numpy(), y):  # each one of its identity's 4 samples (stored as float16)
        candidates = truth.batch(np.full(4, label), np.arange(4))
        assert np.abs(candidates - vec).max(axis=1).min() < 1e-2


# ----------------------------------------------------------------------------- end to end

TINY = {"name": "terms", "seed": 0,
        "model": {"name": "mlp", "embedding_size": 16, "in_features": 32},
        "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
        "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 32, "num_classes": 8,
                 "samples_per_class": 40, "batch_size": 32, "num_workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"steps": 20, "warmup_steps": 0, "decay": "constant"},
        "parallel": {"nproc": 1, "backend": "gloo"},
        "logging": {"log_every": 10, "progress": False},
        "checkpoint": {"resume": "never", "every_steps": 5, "keep_last": 10, "every_minutes": 0}}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 20-step D-Softmax run with a checkpoint every 5 steps, all kept (``dsoft train`` in this process)."""
    tmp = tmp_path_factory.mktemp("terms")
    cfg = json.loads(json.dumps(TINY))
    cfg["logging"]["output_dir"] = str(tmp / "run")
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp / "run.yaml")]) == 0
    return str(tmp / "run")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_a_trained_run_is_measured_at_every_checkpoint(trained_run, tmp_path, capsys):
    out = str(tmp_path / "terms")
    assert main(["bench", "terms", "--runs", trained_run, "--samples", "256", "--out", out]) == 0
    with open(os.path.join(out, "terms.json"), encoding="utf-8") as fh:
        result = json.load(fh)
    (run,) = result["runs"]
    assert run["steps"] == [5, 10, 15, 20] and [r["step"] for r in run["rows"]] == [5, 10, 15, 20]
    st = run["settings"]
    assert (st["loss"], st["scale"], st["end_point"], st["inter_weight"], st["m"], st["num_classes"]) == (
        "d_softmax", 16.0, 1.0, 1.0, None, 8)  # d_softmax's preset d
    assert st["samples"] == 256 and st["trained_as"] == "d_softmax"
    assert all(math.isfinite(v) for v in _numbers(result["runs"]))
    first, last = run["rows"][0], run["rows"][-1]
    assert last["z_y"]["median"] > first["z_y"]["median"] + 0.05  # training pulls the targets in
    for row in run["rows"]:
        assert row["z_y"]["q25"] <= row["z_y"]["median"] <= row["z_y"]["q75"]
        assert 0.0 <= row["saturated"] <= 1.0 and row["grad_y/intra"]["mean"] > 0
        assert row["grad_y/d_softmax"] == row["grad_y/intra"] and row["grad_h/intra"]["mean"] == 0.0
        assert {"margin_deg/d_softmax", "margin_deg/arcface"} <= set(row) and "margin_deg/trained" not in row
        assert -1.0 <= row["weights"]["mean_cos"] <= row["weights"]["mean_max_cos"] <= 1.0
    md = open(os.path.join(out, "terms.md"), encoding="utf-8").read()
    assert "### run: d_softmax s=16 d=1 w=1->0 m=none C=8" in md  # the preset schedule
    assert sum(line.startswith("| 5 |") or line.startswith("| 20 |") for line in md.splitlines()) == 2
    assert os.path.getsize(os.path.join(out, "terms.png")) > 20_000
    assert "wrote" in capsys.readouterr().out


def test_each_checkpoint_is_measured_with_the_inter_weight_its_run_applies_at_its_step(trained_run):
    """The inter-weight schedule (head.inter_weight_end): a step folder's push is w(step) times the inter term."""
    run = terms.open_run(trained_run)
    inputs, labels = terms.training_samples(run.cfg.data, 64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    plain = terms.measure_checkpoint(run.folders[0], inputs, labels, run.settings, "cpu", 64)
    steps = []
    weighted = terms.measure_checkpoint(run.folders[0], inputs, labels, run.settings, "cpu", 64,
                                        weight_at=lambda step: steps.append(step) or 0.25)
    assert steps == [5] and run.settings.inter_weight == 1.0
    assert weighted["grad_h/inter"]["mean"] == pytest.approx(0.25 * plain["grad_h/inter"]["mean"], rel=1e-9)
    assert weighted["grad_y/intra"] == plain["grad_y/intra"] and weighted["z_y"] == plain["z_y"]
    assert weighted["grad_h/d_softmax"]["mean"] == pytest.approx(0.25 * plain["grad_h/d_softmax"]["mean"], rel=1e-9)


def test_a_folder_without_checkpoints_is_refused_with_exit_2(tmp_path, capfd):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    assert main(["bench", "terms", "--runs", str(empty), "--out", str(tmp_path / "o")]) == USER_ERROR_EXIT
    err = capfd.readouterr().err
    assert f"--runs {empty} holds no checkpoint" in err and "checkpoint.every_steps" in err
    assert not (tmp_path / "o").exists()


def test_a_run_that_is_not_a_cosine_head_is_refused_with_exit_2(trained_run, tmp_path, capfd):
    from dsoft_dist.utils import load_weights_only

    copy = tmp_path / "softmax-run"
    shutil.copytree(os.path.join(trained_run, "checkpoints"), copy / "checkpoints")
    newest = sorted((copy / "checkpoints").glob("step-*"))[-1] / "trainer.pt"
    state = load_weights_only(str(newest))
    state["config"]["head"].update(loss="softmax", end_point=None, inter_weight_end=None)  # as softmax saves it
    torch.save(state, newest)
    code = main(["bench", "terms", "--runs", trained_run, str(copy), "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert code == USER_ERROR_EXIT and "head.loss=softmax, not a cosine head" in err and str(copy) in err
    assert not (tmp_path / "o").exists()  # refused before any run was measured


@pytest.mark.slow(reason="a second training run (~5 s): keeps this file's default tier under 20 s")
def test_runs_of_two_losses_read_as_a_sweep(trained_run, tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["head"].update(loss="arcface", m2=0.4)
    cfg["logging"]["output_dir"] = str(tmp_path / "arc")
    (tmp_path / "arc.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "arc.yaml")]) == 0
    out = str(tmp_path / "terms")
    assert main(["bench", "terms", "--runs", trained_run, str(tmp_path / "arc"), "--samples", "128",
                 "--out", out]) == 0
    with open(os.path.join(out, "terms.json"), encoding="utf-8") as fh:
        dsoft, arc = json.load(fh)["runs"]
    assert dsoft["settings"]["trained_as"] == "d_softmax" and arc["settings"]["trained_as"] == "trained"
    assert arc["settings"]["m"] == [1.0, 0.4, 0.0] and arc["steps"] == [5, 10, 15, 20]
    for row in arc["rows"]:  # ArcFace at m = 0.4 is measured beside the m = 0.5 reference
        assert row["grad_y/trained"]["mean"] > 0 and "margin_deg/trained" in row
    assert arc["rows"][-1]["z_y"]["median"] > arc["rows"][0]["z_y"]["median"]
    md = open(os.path.join(out, "terms.md"), encoding="utf-8").read()
    # D-Softmax's terms of a margin run are measured at d_softmax's preset d
    assert "### arc: arcface s=16 d=1 w=1 m=m2=0.4 C=8" in md and "### run: d_softmax" in md
    assert "intra / ArcFace / trained" in md
