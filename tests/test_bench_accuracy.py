"""``dsoft bench accuracy``: the verification protocol against a plain pair loop, a toy sweep through
``dsoft train`` (records, tables, plots), its resumption and its refusals."""
from __future__ import annotations

import json
import os
import re

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
    assert len(names) == len(set(names)) == 14 + 7  # vectors: 7 full + d_softmax_b + 3 x 2 sampled; images: 7
    assert "vectors-d_softmax_k-1of64-s0" in names and "vectors-d_softmax_k-1-s0" not in names
    cfg = accuracy.run_config(next(r for r in runs if r["name"] == "vectors-partial_fc-1of8-s0"), args, "/tmp/x")
    assert (cfg["head"]["loss"], cfg["head"]["negatives"], cfg["head"]["sample_rate"]) == ("arcface", "partial", 0.125)
    assert cfg["data"]["difficulty"] == "hard" and cfg["data"]["seed"] == cfg["seed"] == cfg["head"]["seed"] == 0
    assert accuracy.head_of("d_softmax_b") == ("d_softmax", "batch")
    assert accuracy.sampled_k(cfg) == 2500  # 1/8 of 20,000
    batch_run = next(r for r in runs if r["name"] == "vectors-d_softmax_b-1-s0")
    assert accuracy.sampled_k(accuracy.run_config(batch_run, args, "/tmp/x")) == 256  # the global batch
    assert accuracy.head_of("sampled_softmax") == ("softmax", "random")


def test_d_softmax_over_partial_fc_negatives_is_a_sampled_method_named_but_not_run_by_default():
    assert not any("d_softmax_partial" in r["name"] for r in accuracy.plan(_checked(["--seeds", "0"])))
    args = _checked(["--seeds", "0", "--parts", "images", "--methods", "d_softmax_partial", "--rates", "1,1/8"])
    runs = accuracy.plan(args)
    assert [r["name"] for r in runs] == ["images-d_softmax_partial-1of8-s0"]  # its r = 1 run is d_softmax's
    cfg = accuracy.run_config(runs[0], args, "/tmp/x")
    head = cfg["head"]
    assert (head["loss"], head["negatives"], head["sample_rate"]) == ("d_softmax", "partial", 0.125)
    from dsoft_dist.bench.accuracy_grid import own_method

    assert own_method({"loss": "d_softmax", "negatives": "partial", "sample_rate": 0.125}) == \
        ("d_softmax_partial", 0.125)


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


def test_the_glyph_part_trains_glyph_identities_and_is_only_run_when_asked():
    args = _checked(["--parts", "glyphs", "--seeds", "0", "--glyph-classes", "40", "--glyph-steps", "9"])
    runs = accuracy.plan(args)
    assert [r["name"] for r in runs] == [f"glyphs-{m}-1-s0" for m in accuracy.FULL_LOSSES]
    cfg = accuracy.run_config(runs[-1], args, "/tmp/x")
    assert (cfg["data"]["synthetic_mode"], cfg["data"]["num_classes"], cfg["schedule"]["steps"]) == ("glyphs", 40, 9)
    assert cfg["model"]["name"] == "iresnet_tiny" and cfg["head"]["loss"] == "d_softmax"
    assert cfg["data"]["difficulty"] == "easy"  # at medium neither ArcFace nor D-Softmax learned them in 600 steps
    assert "glyphs" not in _checked(["--seeds", "0"]).part_list  # the default parts stay vectors and images
    inputs, ids = accuracy.unseen_inputs(cfg["data"], 3, 2)
    assert inputs.shape == (6, 32, 32, 3) and ids.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="--glyph-classes 5000 is invalid"):
        _checked(["--parts", "glyphs", "--glyph-classes", "5000"])


def test_a_parts_settings_bind_only_its_runs_and_the_two_forms_never_share_a_folder(tmp_path):
    out = str(tmp_path / "sweep")
    accuracy.check_settings(out, _checked(["--parts", "images", "--image-steps", "900"]))
    accuracy.check_settings(out, _checked(["--parts", "glyphs", "--image-steps", "7"]))  # images not run: no bind
    with open(os.path.join(out, "settings.json"), encoding="utf-8") as fh:
        merged = json.load(fh)
    assert merged["image_steps"] == 900 and merged["glyph_steps"] == 800 and "vector_steps" not in merged
    with pytest.raises(ValueError, match="other settings .*image_steps: 900 there, 7 now"):
        accuracy.check_settings(out, _checked(["--parts", "images,glyphs", "--image-steps", "7"]))
    with pytest.raises(ValueError, match="built-in parts there"):
        args = _checked(["--config", _config_file(tmp_path)])
        accuracy.check_settings(out, args)


PRESETS = {"d_softmax": {"end_point": 1.0, "inter_weight_end": 0.0},
           "d_softmax_paper": {"end_point": 0.9, "inter_weight_end": None}}


def test_a_sweep_folder_from_before_the_d_softmax_presets_is_refused(tmp_path):
    """There d_softmax was the paper's form: its runs must not be reused as the loss at its presets."""
    out = str(tmp_path / "sweep")
    args = _checked(["--parts", "images", "--image-steps", "900"])
    accuracy.check_settings(out, args)
    with open(os.path.join(out, "settings.json"), encoding="utf-8") as fh:
        recorded = json.load(fh)
    assert recorded["presets"] == PRESETS
    accuracy.check_settings(out, args)  # the same presets: reused
    del recorded["presets"]
    with open(os.path.join(out, "settings.json"), "w", encoding="utf-8") as fh:
        json.dump(recorded, fh)
    with pytest.raises(ValueError, match="other settings .*before the D-Softmax presets"):
        accuracy.check_settings(out, args)


@pytest.mark.slow(reason="trains the glyph part end to end and embeds 1,000 unseen glyphs")
def test_toy_glyph_run_verifies_at_most_the_characters_kept_for_evaluation(tmp_path):
    out = str(tmp_path / "glyphs")
    argv = ["--out", out, "--parts", "glyphs", "--methods", "arcface", "--seeds", "0", "--glyph-classes", "16",
            "--glyph-steps", "4", "--eval-identities", "600", "--eval-samples", "2"]
    assert accuracy.main(argv) == 0
    (record,) = _records(out)
    assert record["name"] == "glyphs-arcface-1-s0" and record["genuine_pairs"] == 500  # 500 characters x 1 pair
    assert 0.0 <= record["tar_at_1e-03"] <= 1.0


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


# ---------------------------------------------------------------- the grid: --sweep KEY=V1,V2 and --config FILE

SWEEP_TOY = ["--parts", "vectors", "--methods", "d_softmax", "--seeds", "0", "--vector-classes", "32",
             "--vector-steps", "3", "--eval-identities", "8", "--eval-samples", "2"]
TINY_YAML = """\
model: {name: iresnet_tiny, embedding_size: 32, input_size: 16}
head: {loss: d_softmax, scale: 32.0}
data: {source: synthetic, synthetic_mode: images, image_size: 16, num_classes: 8, samples_per_class: 4,
       batch_size: 16, num_workers: 0}
schedule: {steps: 3, warmup_steps: 1}
logging: {log_every: 1}
eval: {synthetic_identities: 4, synthetic_pairs: 20, folds: 2}
checkpoint: {every_minutes: 0, dir: /somewhere/shared}
"""


def _config_file(tmp_path, text: str = TINY_YAML) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return str(path)


def test_a_two_by_two_grid_over_two_seeds_plans_every_point_and_applies_it_last():
    args = _checked(["--parts", "vectors", "--methods", "d_softmax,d_softmax_k", "--rates", "1/8", "--seeds", "0,1",
                     "--sweep", "head.scale=48,64.0", "--sweep", "head.end_point=0.8,0.9",
                     "--sweep", "data.batch_size=32"])
    runs = accuracy.plan(args)
    assert len(runs) == 2 * 2 * 2 * 2  # seeds x methods x scales x end points (x one batch size)
    assert [r["name"] for r in runs[:4]] == [
        "vectors-d_softmax-1-s0@batch_size=32,end_point=0.8,scale=48",
        "vectors-d_softmax-1-s0@batch_size=32,end_point=0.9,scale=48",
        "vectors-d_softmax-1-s0@batch_size=32,end_point=0.8,scale=64",
        "vectors-d_softmax-1-s0@batch_size=32,end_point=0.9,scale=64"]
    assert runs[-1]["name"] == "vectors-d_softmax_k-1of8-s1@batch_size=32,end_point=0.9,scale=64"
    assert runs[2]["point"] == {"head.scale": 64.0, "head.end_point": 0.8, "data.batch_size": 32}
    checked = accuracy.checked_runs(args)  # every config loads as dsoft train loads it
    assert [run["name"] for run, _ in checked] == [r["name"] for r in runs]
    for run, cfg in checked:
        assert cfg["head"]["scale"] == run["point"]["head.scale"]
        assert cfg["head"]["end_point"] == run["point"]["head.end_point"]
        assert cfg["data"]["batch_size"] == 32  # the point overrides the part's own batch of 256
        assert cfg["seed"] == cfg["data"]["seed"] == cfg["head"]["seed"] == run["seed"]
        assert cfg["logging"]["output_dir"].endswith(os.path.join("runs", run["name"]))
        assert cfg["head"]["sample_rate"] == run["rate"] and cfg["name"] == run["name"]


def test_point_text_is_sorted_folder_safe_and_spells_out_keys_that_share_a_last_component():
    from dsoft_dist.bench.accuracy_report import point_text

    assert point_text({"head.scale": 48.0, "eval.batch_size": 64, "data.batch_size": 32}) == \
        "data.batch_size=32,eval.batch_size=64,scale=48"
    assert point_text({"model.name": "a b/c", "optimizer.nesterov": True, "eval.fars": [0.001, 0.01]}) == \
        "fars=_0.001_0.01_,name=a_b_c,nesterov=true"
    assert point_text({}) == ""


def test_sweep_values_are_read_as_overrides_are():
    from dsoft_dist.bench.accuracy_grid import parse_sweeps, point_overrides

    sweeps = parse_sweeps(["optimizer.lr=1e-3,0.01", "eval.fars=[1e-3,1e-4],[0.01]", "optimizer.name=sgd,adamw"])
    assert sweeps == [("optimizer.lr", [0.001, 0.01]), ("eval.fars", [["1e-3", "1e-4"], [0.01]]),
                      ("optimizer.name", ["sgd", "adamw"])]
    assert point_overrides({"optimizer.lr": 0.001, "optimizer.name": "sgd"}) == ["optimizer.lr=0.001",
                                                                                 'optimizer.name="sgd"']


@pytest.mark.parametrize("sweeps, message", [
    (["head.scal=32,64"], "unknown key 'head.scal'; did you mean 'head.scale'"),
    (["head.scale=32,-1"], r"--sweep point head.scale=-1: head.scale=-1.0 is invalid"),
    (["head.end_point=0.9", "optimizer.name=sgd,rmsprop"], "optimizer.name"),
    (["head.loss=arcface,d_softmax"], "sets head.loss for each run; use --methods"),
    (["data.seed=1,2"], "use --seeds"),
    (["head.sample_rate=1/8"], "use --rates"),
    (["logging.output_dir=a,b"], "use --out"),
    (["head={scale: 3}"], "sweep single keys"),
    (["head.scale=32", "head.scale=64"], "--sweep head.scale is given twice"),
    (["head.scale="], "--sweep head.scale= has an empty value"),
    (["head.scale=32,,64"], "has an empty value"),
    (["head.scale=32,32.0"], "gives 32.0 twice"),
    (["head.scale"], "write KEY=V1,V2"),
])
def test_a_bad_sweep_exits_2_naming_it_before_anything_trains(sweeps, message, tmp_path, capsys):
    from dsoft_dist.cli import main

    out = tmp_path / "out"
    argv = ["bench", "accuracy", "--out", str(out), *SWEEP_TOY]
    for item in sweeps:
        argv += ["--sweep", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsoft bench: error: ") and re.search(message, err), err
    assert not out.exists()  # refused before settings.json, a run folder or a training


def test_summarize_groups_points_apart_and_the_markdown_has_their_columns():
    from dsoft_dist.bench.accuracy_report import format_markdown, summarize

    records = _planted_sweep()
    rows = summarize(records)
    key = {(r["method"], r["rate"], r["point"]["head.scale"]): r for r in rows}
    assert len(rows) == 3 * 2  # (d_softmax at 1, d_softmax_k at 1/8, d_softmax_k as d_softmax at 1) x 2 points
    assert key[("d_softmax", 1.0, 32)]["accuracy"] == pytest.approx(90.5) and key[("d_softmax", 1.0, 32)]["seeds"] == 2
    assert key[("d_softmax", 1.0, 64)]["accuracy"] == pytest.approx(80.5)
    assert key[("d_softmax", 1.0, 64)]["accuracy_sd"] == pytest.approx(np.std([80, 81], ddof=1))
    assert key[("d_softmax_k", 1.0, 64)]["same_as"] == "d_softmax" and key[("d_softmax_k", 1.0, 64)]["accuracy"] == \
        pytest.approx(80.5)  # the r = 1 copy of the same point's full loss, not the other point's
    md = format_markdown({"settings": _SETTINGS, "machine": _MACHINE, "records": records, "summary": rows})
    assert "| method | r | K | seeds | head.scale | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 10-fold accuracy | train s |" in md
    assert "| d_softmax | 1 | 64 | 2 | 32 | 50.50 +- 0.71 | unresolvable | 90.50 +- 0.71 | 3 |" in md
    assert "| d_softmax | 1 | 64 | 2 | 64 | 40.50 +- 0.71 | unresolvable | 80.50 +- 0.71 | 3 |" in md
    assert "| d_softmax_k | 1/8 | 8 | 2 | 64 |" in md
    unswept = summarize([{k: v for k, v in r.items() if k != "point"} for r in records])
    assert len(unswept) == 3 and "head.scale" not in format_markdown(
        {"settings": _SETTINGS, "machine": _MACHINE, "records": records, "summary": unswept})


def test_the_table_gives_partial_negatives_k_as_a_floor():
    """partial_fc and d_softmax_partial keep every class of the batch besides r C random ones, so their K is at
    least r C: the table says >=, D-Softmax-K's r C is its K."""
    from dsoft_dist.bench.accuracy_report import format_markdown, summarize

    records = [{**r, "method": method, "name": r["name"].replace("d_softmax_k", method)}
               for method in ("d_softmax_k", "partial_fc", "d_softmax_partial")
               for r in _planted_sweep() if r["method"] == "d_softmax_k"]
    md = format_markdown({"settings": _SETTINGS, "machine": _MACHINE, "records": records,
                          "summary": summarize(records)})
    assert "| d_softmax_k | 1/8 | 8 | 2 | 32 |" in md
    assert "| partial_fc | 1/8 | >= 8 | 2 | 32 |" in md and "| d_softmax_partial | 1/8 | >= 8 | 2 | 32 |" in md


def test_the_sweep_plot_is_a_png_of_the_points_and_only_written_with_a_grid(tmp_path):
    from dsoft_dist.bench.accuracy_report import summarize
    from dsoft_dist.bench.sweep_report import point_axis, write_sweep_plot

    rows = summarize(_planted_sweep())
    x_of, ticks, title = point_axis(rows)
    assert sorted(x_of.values()) == [32.0, 64.0] and ticks is None and title == "head.scale"  # the value itself
    two_keys = [{**r, "point": {**r["point"], "head.end_point": 0.9}} for r in rows]
    x_of, ticks, title = point_axis(two_keys)
    assert sorted(x_of.values()) == [0, 1] and ticks == ["end_point=0.9,scale=32", "end_point=0.9,scale=64"]
    paths = write_sweep_plot({"summary": rows}, str(tmp_path))
    with open(paths["sweep.png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    plain = summarize([{k: v for k, v in r.items() if k != "point"} for r in _planted_sweep()])
    assert write_sweep_plot({"summary": plain}, str(tmp_path / "none")) == {}


def test_a_real_sweep_resumes_and_an_extended_grid_trains_only_the_new_point(tmp_path, capsys):
    out = str(tmp_path / "grid")
    argv = ["--out", out, *SWEEP_TOY, "--sweep", "head.scale=16"]
    assert accuracy.main(argv) == 0
    first = os.path.join(out, "runs", "vectors-d_softmax-1-s0@scale=16", "metrics.jsonl")
    stamp = os.stat(first).st_mtime_ns
    (record,) = _records(out)
    assert record["point"] == {"head.scale": 16} and record["name"].endswith("@scale=16")
    capsys.readouterr()

    assert accuracy.main(argv) == 0  # the same grid again: nothing to train
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert os.stat(first).st_mtime_ns == stamp and len(_records(out)) == 1

    assert accuracy.main([*argv[:-1], "head.scale=16,32"]) == 0  # one more value: only its run trains
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(trained) == 1 and trained[0].startswith("[2/2] vectors-d_softmax-1-s0@scale=32:"), trained
    assert os.stat(first).st_mtime_ns == stamp and [r["point"] for r in _records(out)] == [{"head.scale": 16},
                                                                                            {"head.scale": 32}]
    with open(os.path.join(out, "runs", "vectors-d_softmax-1-s0@scale=32", "report.json"), encoding="utf-8") as fh:
        assert json.load(fh)["config"]["head"]["scale"] == 32.0
    md = open(os.path.join(out, "accuracy.md"), encoding="utf-8").read()
    assert "| head.scale |" in md and "| d_softmax | 1 | 32 | 1 | 16 |" in md
    assert "| d_softmax | 1 | 32 | 1 | 32 |" in md
    assert os.path.getsize(os.path.join(out, "sweep.png")) > 0
    assert not os.path.exists(os.path.join(out, "accuracy_vs_rate.png"))  # a grid's figures are sweep.png's
    with open(os.path.join(out, "settings.json"), encoding="utf-8") as fh:
        assert "sweep" not in json.load(fh)  # the grid is not a setting: extending it reuses the runs


def test_config_runs_keep_the_users_config_with_the_bench_run_policy_and_the_point(tmp_path):
    args = _checked(["--config", _config_file(tmp_path), "--seeds", "3", "--sweep", "head.end_point=0.85,0.9",
                     "--out", str(tmp_path / "out")])
    runs = accuracy.checked_runs(args)
    assert [run["name"] for run, _ in runs] == ["config-d_softmax-1-s3@end_point=0.85",
                                                "config-d_softmax-1-s3@end_point=0.9"]
    run, cfg = runs[1]
    assert cfg["head"]["end_point"] == 0.9 and cfg["head"]["scale"] == 32.0 and cfg["model"]["embedding_size"] == 32
    assert cfg["seed"] == cfg["data"]["seed"] == cfg["head"]["seed"] == 3
    assert cfg["checkpoint"] | {"every_steps": 1, "keep_last": 1, "resume": "auto", "dir": ""} == cfg["checkpoint"]
    assert cfg["logging"]["output_dir"] == str(tmp_path / "out" / "runs" / run["name"])
    assert cfg["parallel"]["nproc"] == 1 and accuracy.settings(args) == {"config_sha256": args.config_sha256,
                                                                          "nproc": None, "presets": PRESETS}
    sampled = _checked(["--config", _config_file(tmp_path), "--seeds", "0", "--methods", "d_softmax_k,arcface",
                        "--rates", "1/4", "--nproc", "2"])
    (k_run, k_cfg), (a_run, a_cfg) = accuracy.checked_runs(sampled)
    assert (k_run["name"], a_run["name"]) == ("config-d_softmax_k-1of4-s0", "config-arcface-1-s0")
    assert (k_cfg["head"]["negatives"], k_cfg["head"]["sample_rate"], k_cfg["parallel"]["nproc"]) == ("random", 0.25, 2)
    from dsoft_dist.bench.accuracy_grid import own_method

    assert own_method({"loss": "d_softmax", "negatives": "random", "sample_rate": 0.125}) == ("d_softmax_k", 0.125)
    assert own_method({"loss": "d_softmax", "negatives": "nearest", "sample_rate": 0.125}) == ("d_softmax_kn", 0.125)
    assert own_method({"loss": "cosface", "negatives": "all", "sample_rate": 1.0}) == ("cosface", 1.0)


@pytest.mark.parametrize("edit, argv, message", [
    (("synthetic_identities: 4", "synthetic_identities: 0"), [],
     "--config .*my.yaml: its eval section verifies nothing.*add eval.bins, eval.pairs or eval.synthetic_identities"),
    (None, ["--parts", "images"], "--parts 'images' and --config"),
    (None, ["--sweep", "eval.synthetic_identities=0,4"], "--sweep point eval.synthetic_identities=0: .*nothing"),
    (("scale: 32.0", "scale: 0"), [], "head.scale=0"),  # the file's own error, from the config loader
])
def test_a_bad_config_form_is_refused_before_anything_trains(edit, argv, message, tmp_path):
    text = TINY_YAML.replace(*edit) if edit else TINY_YAML
    args = accuracy.build_parser().parse_args(["--config", _config_file(tmp_path, text), "--out",
                                               str(tmp_path / "out"), *argv])
    with pytest.raises(ValueError, match=message):
        accuracy.check_args(args)
        accuracy.checked_runs(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow(reason="two image runs of a user config through dsoft train, each verified by the trainer (~17 s)")
def test_a_config_sweep_reports_the_trainers_own_verification(tmp_path, capsys):
    config, out = _config_file(tmp_path), str(tmp_path / "mine")
    argv = ["--config", config, "--out", out, "--seeds", "0", "--sweep", "head.end_point=0.85,0.9"]
    assert accuracy.main(argv) == 0
    records = _records(out)
    assert [r["name"] for r in records] == ["config-d_softmax-1-s0@end_point=0.85",
                                            "config-d_softmax-1-s0@end_point=0.9"]
    md = open(os.path.join(out, "accuracy.md"), encoding="utf-8").read()
    assert "| head.end_point | synthetic_unseen 10-fold accuracy | synthetic_unseen TAR@FAR=1e-3 (VAL) |" in md
    for r in records:
        with open(os.path.join(out, "runs", r["name"], "report.json"), encoding="utf-8") as fh:
            report = json.load(fh)
        final = report["final"]  # what the trainer verified at the end of training
        assert report["config"]["head"]["end_point"] == r["point"]["head.end_point"]
        assert r["figures"] == ["synthetic_unseen/accuracy", "synthetic_unseen/val_at_far"]
        assert r["synthetic_unseen/accuracy"] == final["synthetic_unseen/accuracy"]
        assert f"| {r['point']['head.end_point']} | {100 * final['synthetic_unseen/accuracy']:.2f} +- 0.00 | " \
               f"{100 * final['synthetic_unseen/val_at_far']:.2f} +- 0.00 |" in md
    assert os.path.getsize(os.path.join(out, "sweep.png")) > 0
    with open(config, "a", encoding="utf-8") as fh:
        fh.write("optimizer: {lr: 0.05}\n")  # a changed config file is another sweep
    with pytest.raises(ValueError, match="other settings .*config_sha256"):
        accuracy.main(argv)


_SETTINGS = {"vector_classes": 64, "vector_steps": 12, "image_classes": 16, "image_steps": 6, "eval_identities": 12,
             "eval_samples": 3, "nproc": 1}
_MACHINE = {"command": "dsoft bench accuracy", "host": "h", "cpu_count": 2, "device": "cpu", "torch": "x",
            "date": "today"}


def _planted_sweep() -> list[dict]:
    """d_softmax at r = 1 and d_softmax_k at 1/8, two seeds, a grid over head.scale of 32 and 64: accuracy
    0.90 / 0.91 at 32 and 0.80 / 0.81 at 64 (d_softmax_k 0.1 lower), TAR@FAR=1e-3 0.4 lower."""
    records = []
    for seed in (0, 1):
        for method, rate, k in (("d_softmax", 1.0, 64), ("d_softmax_k", 0.125, 8)):
            for scale, base in ((32, 0.90), (64, 0.80)):
                acc = base + 0.01 * seed - (0.1 if method == "d_softmax_k" else 0.0)
                records.append({"part": "vectors", "method": method, "rate": rate, "seed": seed, "k": k,
                                "name": f"vectors-{method}-s{seed}@scale={scale}", "point": {"head.scale": scale},
                                "train_s": 3.0, "accuracy": acc, "accuracy_std": 0.01, "tar_at_1e-03": acc - 0.4,
                                "tar_at_1e-04": acc - 0.5, "genuine_pairs": 36, "impostor_pairs": 5000,
                                "loss_curve": [[1, 2.0], [12, 1.0]]})
    return records
