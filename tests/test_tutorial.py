"""docs/tutorial.md runs as written: its bash blocks, at toy size, as one script, on real files."""
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
# toy sizes: 40 identities x 6 images, 20 steps of 16 per rank on 2 ranks, 32 px; 0.25 * 40 / 2 = 5 sampled classes per rank
TOY = {"IDS": "40", "PER_ID": "6", "VAL_IDS": "20", "PAIRS": "200", "SIZE": "32", "STEPS": "20", "BATCH": "16",
       "NPROC": "2", "RATE": "0.25"}
SUBCOMMANDS = ("data", "train", "eval", "export", "config", "demo", "ckpt", "bench", "doctor")


def bash_blocks():
    return BLOCK.findall(TUTORIAL)


def toy_first_block(block):
    """The first block with the toy value of every size variable (each must be there, exported)."""
    lines = block.splitlines()
    assert lines[0].startswith("export "), "the first block opens with the size variables"
    sizes = dict(word.split("=", 1) for word in shlex.split(lines[0])[1:])
    assert set(sizes) == set(TOY), f"size variables {sorted(sizes)} != the test's {sorted(TOY)}"
    lines[0] = "export " + " ".join(f"{k}={v}" for k, v in TOY.items())
    return "\n".join(lines) + "\n"


def dsoft_commands(script):
    """The `dsoft ...` command lines of a bash script (continuations joined, heredoc bodies skipped)."""
    commands, heredoc = [], None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        marker = re.search(r"<<-?\s*'?(\w+)'?", line)
        if marker:
            heredoc = marker.group(1)
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "dsoft":
                commands.append(words)
    return commands


def expand(word):
    return re.sub(r"\$(\w+)", lambda m: TOY[m.group(1)], word)


def test_size_variables_are_the_only_sizes():
    blocks = bash_blocks()
    toy_first_block(blocks[0])  # the variables, all of them
    later = "\n".join(blocks[1:])
    for name in TOY:
        assert re.search(rf'\${name}\b|"{name}"', later), f"size variable {name} is never used"
    # no literal number on a dsoft command line: sizes come from the variables
    for words in dsoft_commands(later):
        for word in words:
            value = word.split("=", 1)[-1]
            is_number = re.fullmatch(r"[0-9.e+-]+", value) and re.search(r"[0-9]", value)
            assert not is_number, f"literal {word} in: {' '.join(words)}"


def test_no_dsoft_command_outside_the_bash_blocks():
    """Every `dsoft ...` the text mentions (outside the bash blocks) is a prefix of a command the test runs."""
    run = [" ".join(w) for w in dsoft_commands("\n".join(bash_blocks()))]
    prose = BLOCK.sub("", TUTORIAL)
    assert "```" not in prose.replace("```bash", ""), "a fenced block other than bash; the test would not run it"
    for mention in re.findall(r"\bdsoft(?: +[\w./$=:-]+)+", prose):
        words = mention.split()
        if words[1] not in SUBCOMMANDS:
            continue  # not a subcommand
        assert any(c == mention or c.startswith(mention + " ") for c in run), \
            f"'{mention}' is mentioned but not run by the tutorial's bash blocks"


@pytest.mark.slow(reason="the whole tutorial as one script: convert, 2-rank training, eval, export (~30 s)")
def test_tutorial_runs_end_to_end_at_toy_size(tmp_path):
    blocks = bash_blocks()
    assert len(blocks) >= 7
    script = toy_first_block(blocks[0]) + "\n".join(blocks[1:])
    expected = dsoft_commands(script)
    assert [w[1] for w in expected].count("train") == 2 and "export" in [w[1] for w in expected]

    # a `dsoft` shim first on PATH logs every invocation, then runs the venv's dsoft
    bindir, log = tmp_path / "bin", tmp_path / "dsoft-calls.txt"
    bindir.mkdir()
    real = Path(sys.executable).parent / "dsoft"
    assert real.is_file(), f"no dsoft next to {sys.executable}"
    shim = bindir / "dsoft"
    shim.write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\nexec {shlex.quote(str(real))} "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PATH=f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"

    # every dsoft command of the tutorial ran, in order, with the toy sizes, and nothing else did
    calls = log.read_text().splitlines()
    assert calls == [" ".join(expand(w) for w in words[1:]) for words in expected]

    d = work / "dsoft-tutorial"
    ids, per_id, val_ids = int(TOY["IDS"]), int(TOY["PER_ID"]), int(TOY["VAL_IDS"])
    # 1. the folders: IDS x PER_ID training images, VAL_IDS held-out identities of another range
    train_ids = sorted(p.name for p in (d / "faces" / "train").iterdir())
    val_names = sorted(p.name for p in (d / "faces" / "val").iterdir())
    assert len(train_ids) == ids and len(val_names) == val_ids and not set(train_ids) & set(val_names)
    assert len(list((d / "faces" / "train").glob("*/*.jpg"))) == ids * per_id

    # 2. shards + manifest, counts agree with the tars
    manifest = json.loads((d / "shards" / "manifest.json").read_text())
    assert manifest["num_classes"] == ids and manifest["num_samples"] == ids * per_id
    total, labels = 0, set()
    for shard in manifest["shards"]:
        with tarfile.open(d / "shards" / shard["name"]) as tar:
            members = tar.getmembers()
            cls = [m for m in members if m.name.endswith(".cls")]
            assert len(cls) == shard["samples"] and sum(m.name.endswith(".jpg") for m in members) == shard["samples"]
            labels |= {int(tar.extractfile(m).read()) for m in cls}
            total += len(cls)
    assert total == ids * per_id and labels == set(range(ids))

    # 3. verification sets of the held-out identities
    from dsoft_dist.eval import load_bin
    bins, issame = load_bin(str(d / "val.bin"))
    assert len(bins) == 2 * int(TOY["PAIRS"]) and len(issame) == int(TOY["PAIRS"]) and 0 < sum(issame) < len(issame)
    pair_lines = [x for x in (d / "val_pairs.txt").read_text().splitlines() if x and not x.startswith("#")]
    assert len(pair_lines) == int(TOY["PAIRS"]) and all(x.startswith("faces/val/") for x in pair_lines)

    # 4 + 7. both runs: the head they were asked for, verification at start, middle and end
    reports = {}
    for run, loss, negatives, rate in (("dsoftmax_k", "d_softmax", "random", float(TOY["RATE"])),
                                       ("arcface", "arcface", "all", 1.0)):
        out = d / "runs" / run
        report = json.loads((out / "report.json").read_text())
        head = report["config"]["head"]
        assert (head["loss"], head["negatives"], head["sample_rate"]) == (loss, negatives, rate)
        assert report["world_size"] == int(TOY["NPROC"]) and report["config"]["data"]["source"] == "webdataset"
        assert report["log"][-1]["step"] == int(TOY["STEPS"]) and report["bad_samples"] == 0
        assert report["log"][-1]["target_cos"] > report["log"][0]["target_cos"] + 0.05  # it trained
        steps = [e["step"] for e in report["evals"]]
        assert steps == [0, int(TOY["STEPS"]) // 2, int(TOY["STEPS"])]
        assert 0.0 <= report["final"]["val/accuracy"] <= 1.0
        assert (out / "backbone.pt").stat().st_size > 0 and (out / "report.md").is_file()
        # 5. the evaluation of the saved backbone: 10 folds on val.bin, TAR@FAR on the pair list
        results = json.loads((out / "eval" / "results.json").read_text())
        b, p = results["bins"][0], results["pairs"][0]
        assert b["name"] == "val" and b["folds"] == 10 and len(b["fold_accuracies"]) == 10
        assert b["num_pairs"] == int(TOY["PAIRS"]) and 0.0 <= b["accuracy"] <= 1.0
        # the same backbone and pairs as the trainer's last verification, which embedded half of val.bin on each
        # of the 2 ranks, with rank 0's BatchNorm statistics (the ones backbone.pt holds)
        assert b["accuracy"] == pytest.approx(report["final"]["val/accuracy"], abs=1e-9)
        assert p["num_pairs"] == int(TOY["PAIRS"]) and 0.0 <= p["auc"] <= 1.0 and "1e-03" in p["tar_at_far"]
        assert (out / "eval" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        reports[run] = (report, results)
    for run, (report, results) in reports.items():  # what each dsoft eval printed: its table row
        acc = results["bins"][0]["accuracy"]
        assert re.search(rf"^val\s+{TOY['PAIRS']}\s+{acc:.4f}\s", proc.stdout, re.M), proc.stdout[-3000:]
    assert proc.stdout.count("TAR@1e-03") >= 2

    # 6. the ONNX file: non-empty, loads, dynamic batch, parity was checked
    onnx_path = d / "runs" / "dsoftmax_k" / "backbone.onnx"
    assert onnx_path.stat().st_size > 10_000
    assert "parity max|diff|" in proc.stdout
    try:
        import onnx
    except ImportError:
        pass
    else:
        graph = onnx.load(str(onnx_path)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic

    # 7. the side-by-side table: one row per run, with the numbers of its files
    for run, (report, results) in reports.items():
        row = next(x for x in proc.stdout.splitlines() if x.startswith(run + " ")).split()
        done = report["throughput"]
        assert done["samples"] == int(TOY["STEPS"]) * int(TOY["BATCH"]) * int(TOY["NPROC"])
        pairs = results["pairs"][0]
        assert row[3:] == [f"{done['samples_per_s']:.0f}", f"{report['log'][-1]['loss']:.4f}",
                           f"{results['bins'][0]['accuracy']:.4f}", f"{pairs['tar_at_far']['1e-03']['tar']:.4f}",
                           f"{pairs['auc']:.4f}"]


def step_7_script() -> str:
    """The Python of step 7's heredoc (the comparison table)."""
    block = TUTORIAL[TUTORIAL.index("## 7."):]
    return re.search(r"python - <<'EOF'\n(.*?)^EOF$", block, re.S | re.M).group(1)


def test_step_7_table_columns_are_distinct_measurements(tmp_path):
    """Each column of the comparison table comes from its own source: the throughput over the whole run (not the
    last log row's), the last loss, the evaluation's accuracy once (the trainer's final verification of val.bin is
    the same number), TAR@1e-3 and AUC. Run on report.json files write_report writes."""
    from dsoft_dist.config import config_from_dict, config_to_dict
    from dsoft_dist.train.report import write_report

    for run, loss, negatives in (("dsoftmax_k", "d_softmax", "random"), ("arcface", "arcface", "all")):
        cfg = config_from_dict({"head": {"loss": loss, "negatives": negatives},
                                "data": {"batch_size": 16, "num_classes": 40}})
        rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 0.1, "samples_per_s": 999.0} for s in (1, 10, 20)]
        out = tmp_path / "runs" / run
        (out / "eval").mkdir(parents=True)
        write_report(str(out), {"config": config_to_dict(cfg), "world_size": 2, "backend": "gloo", "engine": "ddp",
                                "train_seconds": 4.0, "head_step_in_backward": True, "log": rows,
                                "evals": [{"step": 20, "val/accuracy": 0.8125}], "final": {"val/accuracy": 0.8125}})
        (out / "eval" / "results.json").write_text(json.dumps(
            {"bins": [{"name": "val", "accuracy": 0.8125}],
             "pairs": [{"name": "val_pairs", "tar_at_far": {"1e-03": {"tar": 0.25}}, "auc": 0.875}]}))
    proc = subprocess.run([sys.executable, "-c", step_7_script()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    assert len(lines) == 2 and len(set(header.split())) == len(header.split()), header  # no column twice
    for line in lines:
        # 20 steps x 16 samples x 2 ranks / 4.0 s = 160 samples/s over the run (999 is the last row's only);
        # the accuracy once
        assert line.split()[3:] == ["160", "3.0000", "0.8125", "0.2500", "0.8750"], (header, line)
