"""``dsoft bench accuracy``: the verification protocol against a plain pair loop, a toy sweep through
``dsoft train`` (records, tables, plots), its resumption and its refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dsoft_dist.bench import accuracy
from dsoft_dist.eval.roc import tar_at_far
from dsoft_dist.eval.verification import verify_scores_kfold
from dsoft_dist.models import build_model

TOY = ["--vector-classes", "64", "--vector-steps", "12", "--image-classes", "16", "--image-steps", "6",
       "--eval-identities", "12", "--eval-samples", "3"]


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _checked(argv: list[str]):
    args = accuracy.build_parser().parse_args(argv)
    accuracy.check_args(args)
    return args


def test_verify_embeddings_scores_every_pair_once_like_a_plain_loop():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(7), 3)
    emb = rng.standard_normal((7, 16))[ids] + 0.8 * rng.standard_normal((21, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores, same = [], []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            scores.append(float(emb[i] @ emb[j]))
            same.append(bool(ids[i] == ids[j]))
    scores, same = np.array(scores), np.array(same)
    got = accuracy.verify_embeddings(emb.astype(np.float32), ids, seed=3)
    assert got["genuine_pairs"] == 7 * 3 == same.sum() and got["impostor_pairs"] == 21 * 20 // 2 - 21
    want = tar_at_far(scores, same, fars=accuracy.FARS)
    assert got["tar_at_1e-03"] == pytest.approx(want[1e-3], abs=1e-6)
    assert got["tar_at_1e-04"] == pytest.approx(want[1e-4], abs=1e-6)
    # the 10-fold accuracy: all genuine pairs + as many impostors drawn with the seed
    pick = np.random.default_rng([3, 17])
    genuine = np.flatnonzero(same)
    pairs = pick.permutation(np.concatenate([genuine, pick.choice(np.flatnonzero(~same), len(genuine),
                                                                  replace=False)]))
    assert got["accuracy"] == pytest.approx(verify_scores_kfold(scores[pairs], same[pairs])["accuracy"], abs=1e-6)


def test_plan_maps_every_method_to_its_head_and_reuses_the_full_loss_at_rate_one():
    args = _checked(["--seeds", "0", "--rates", "1,1/8,1/64"])
    runs = accuracy.plan(args)
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names)) == 13 + 6  # vectors: 6 full + d_softmax_b + 3 x 2 sampled; images: 6
    assert "vectors-d_softmax_k-1of64-s0" in names and "vectors-d_softmax_k-1-s0" not in names
    cfg = accuracy.run_config(next(r for r in runs if r["name"] == "vectors-partial_fc-1of8-s0"), args, "/tmp/x")
    assert (cfg["head"]["loss"], cfg["head"]["negatives"], cfg["head"]["sample_rate"]) == ("arcface", "partial", 0.125)
    assert cfg["data"]["difficulty"] == "hard" and cfg["data"]["seed"] == cfg["seed"] == cfg["head"]["seed"] == 0
    assert accuracy.head_of("d_softmax_b") == ("d_softmax", "batch")
    assert accuracy.sampled_k(cfg) == 2500  # 1/8 of 20,000
    batch_run = next(r for r in runs if r["name"] == "vectors-d_softmax_b-1-s0")
    assert accuracy.sampled_k(accuracy.run_config(batch_run, args, "/tmp/x")) == 256  # the global batch
    assert accuracy.head_of("sampled_softmax") == ("softmax", "random")


@pytest.mark.slow(reason="the whole toy sweep through dsoft train in subprocesses (~20 s)")
def test_toy_sweep_trains_through_dsoft_train_verifies_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--out", out, "--parts", "vectors", "--methods", "d_softmax,d_softmax_k", "--rates", "1,1/8",
            "--seeds", "0,1", *TOY]
    assert accuracy.main(argv) == 0
    records = _records(out)
    assert sorted(r["name"] for r in records) == ["vectors-d_softmax-1-s0", "vectors-d_softmax-1-s1",
                                                  "vectors-d_softmax_k-1of8-s0", "vectors-d_softmax_k-1of8-s1"]
    for r in records:
        run = os.path.join(out, "runs", r["name"])
        with open(os.path.join(run, "report.json"), encoding="utf-8") as fh:
            report = json.load(fh)
        assert report["config"]["head"]["sample_rate"] == r["rate"] and report["config"]["seed"] == r["seed"]
        assert r["k"] == (64 if r["rate"] == 1 else 8) and r["loss_curve"][-1][0] == 12
    # training is what the verification measures: the trained backbone beats its untrained start
    args = _checked(argv)
    first = next(r for r in accuracy.plan(args) if r["name"] == "vectors-d_softmax-1-s0")
    inputs, ids = accuracy.unseen_inputs(accuracy.run_config(first, args, out)["data"], 12, 3)
    torch.manual_seed(0)
    untrained = build_model("mlp", in_features=128, embedding_size=128).eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(untrained(torch.from_numpy(inputs)), dim=1).numpy()
    before = accuracy.verify_embeddings(emb, ids)["accuracy"]
    trained = next(r for r in records if r["name"] == "vectors-d_softmax-1-s0")["accuracy"]
    assert trained > before + 0.05, (trained, before)
    md = open(os.path.join(out, "accuracy.md"), encoding="utf-8").read()
    assert "| d_softmax_k (= d_softmax) | 1 | 64 | 2 |" in md and "| d_softmax_k | 1/8 | 8 | 2 |" in md
    assert "unresolvable" in md  # 36 genuine / 594 impostor pairs cannot resolve FAR = 1e-4
    for name in ("accuracy.json", "accuracy.csv", "accuracy_vs_rate.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    capsys.readouterr()

    # resumed: a record that was lost is verified again from the run's checkpoint; the rest are kept
    kept = records[:-1]
    with open(os.path.join(out, "results.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    assert accuracy.main(argv) == 0
    printed = capsys.readouterr().out
    trained_again = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(trained_again) == 1 and trained_again[0].startswith(f"[4/4] {records[-1]['name']}:"), printed
    again = {r["name"]: r for r in _records(out)}
    assert again[records[-1]["name"]]["tar_at_1e-03"] == records[-1]["tar_at_1e-03"]
    with open(os.path.join(out, "runs", records[-1]["name"], "train.log"), encoding="utf-8") as fh:
        assert "resumed from" in fh.read()

    with pytest.raises(ValueError, match="other settings .*vector_steps: 12 there, 13 now"):
        accuracy.main([*argv, "--vector-steps", "13"])


@pytest.mark.slow(reason="trains the image part of the sweep end to end")
def test_toy_image_sweep_verifies_flip_summed_embeddings(tmp_path):
    out = str(tmp_path / "images")
    assert accuracy.main(["--out", out, "--parts", "images", "--methods", "cosface", "--seeds", "0", *TOY]) == 0
    (record,) = _records(out)
    assert record["name"] == "images-cosface-1-s0" and record["genuine_pairs"] == 12 * 3
    assert 0.0 <= record["accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--parts", "audio"], "--parts 'audio'"),
    (["--methods", "d_softmax,nope"], "unknown \\['nope'\\]"),
    (["--rates", "0"], "--rates '0'"),
    (["--seeds", "a"], "--seeds 'a'"),
    (["--eval-samples", "1"], "verification needs"),
    (["--nproc", "3"], "--nproc 3 does not divide"),
])
def test_bad_options_are_refused_naming_the_option(argv, message):
    args = accuracy.build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=message):
        accuracy.check_args(args)
