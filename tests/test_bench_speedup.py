"""`dsoft bench speedup` at toy size: every method and rate is a record with the issue's fields, the speedups are
the ratios of the measured medians, the outputs are written, and methods that cannot fit are skipped by name."""
import csv
import json
import re

import pytest
import torch

from dsoft_dist.bench import speedup
from dsoft_dist.cli import main

FIELDS = {"method", "rate", "classes", "ranks", "step_ms", "peak_mb", "transient_mb"}


def _records(out):
    return json.loads((out / "speedup.json").read_text())["records"]


def _check(records, classes, ranks, rates):
    got = {(r["method"], r["rate"]) for r in records if r["method"] != "d_softmax_b"}
    want = {(m, 1.0) for m in ("softmax_naive", "arcface", "d_softmax")}
    want |= {(m, r) for m in speedup.SAMPLED for r in rates}
    assert got == want
    by = {(r["method"], r["rate"]): r for r in records}
    full = by[("d_softmax", 1.0)]
    for r in records:
        assert FIELDS <= set(r) and r["classes"] == classes and r["ranks"] == ranks
        assert r["step_ms"] > 0 and r["peak_mb"] >= r["transient_mb"] >= 0
        assert r["speedup_vs_d_softmax"] == pytest.approx(full["step_ms"] / r["step_ms"])
    assert by[("d_softmax_k", rates[-1])]["k"] == pytest.approx(rates[-1] * classes, abs=ranks)
    for r in (r for r in records if r["method"] == "d_softmax_kn"):  # its step carries its share of the table's builds
        assert r["build_ms"] > 0 and r["build_every"] >= 1
        assert r["step_ms"] == pytest.approx(r["steady_ms"] + r["build_ms"] / r["build_every"])
    b = next(r for r in records if r["method"] == "d_softmax_b")
    assert 0 < b["rate"] < 1 and b["k"] <= 64  # the batch's classes, at most the global batch


def test_speedup_one_rank_writes_every_record_table_and_plot(tmp_path, capsys):
    out = tmp_path / "sp"
    assert main(["bench", "speedup", "--classes", "4000", "--dim", "32", "--batch", "64", "--rates", "1/4,1/16",
                 "--repeats", "1", "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    records = _records(out)
    _check(records, 4000, 1, [0.25, 0.0625])
    assert json.loads((tmp_path / "r.json").read_text()) == records
    rows = list(csv.DictReader((out / "speedup.csv").open()))
    assert len(rows) == len(records) and rows[0]["method"] == "softmax_naive"
    md = (out / "speedup.md").read_text()
    assert "| d_softmax_k | 1/16 |" in md and "dsoft bench speedup" in md
    assert re.search(r"d_softmax_kn at r = 1/16: a steady step [\d.,]+ ms plus its share of the nearest-class table's "
                     r"build \([\d.,]+ ms every [\d,]+ draws\)", md), md
    assert (out / "speedup.png").stat().st_size > 10_000
    assert "| partial_fc | 1/4 |" in capsys.readouterr().out


@pytest.mark.dist
def test_speedup_two_ranks_through_the_command(tmp_path):
    out = tmp_path / "sp"
    assert main(["bench", "speedup", "--classes", "4000", "--dim", "32", "--batch", "64", "--rates", "1/16",
                 "--repeats", "1", "--nproc", "2", "--methods", "softmax_naive,d_softmax,d_softmax_b,d_softmax_k,"
                 "d_softmax_kn,partial_fc,sampled_softmax,arcface", "--out", str(out), "--no-progress"]) == 0
    _check(_records(out), 4000, 2, [0.0625])


def test_a_method_that_cannot_fit_is_skipped_with_the_reason():
    args = speedup.build_parser().parse_args(["--classes", "1000", "--device", "cpu"])
    speedup.check_args(args)
    record = speedup.time_method("softmax_naive", 1.0, 10**10, args, torch.device("cpu"), 0, 1)
    assert "step_ms" not in record and "GiB available" in record["skipped"]


def test_bad_options_name_the_value():
    for argv, message in ((["--rates", "1/0"], "--rates '1/0'"), (["--rates", "2"], "--rates '2'"),
                          (["--methods", "softmax"], "unknown ['softmax']"), (["--classes", "0"], "--classes '0'"),
                          (["--batch", "5", "--nproc", "2"], "not divisible by the 2 ranks")):
        message = re.escape(message)
        args = speedup.build_parser().parse_args(argv + ["--device", "cpu"])
        with pytest.raises(ValueError, match=message):
            speedup.check_args(args)


def test_end_to_end_adds_the_backbone_and_the_head_share(tmp_path):
    out = tmp_path / "sp"
    assert main(["bench", "speedup", "--classes", "2000", "--dim", "32", "--batch", "32", "--rates", "1/8",
                 "--repeats", "1", "--methods", "d_softmax,d_softmax_k", "--end-to-end", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "speedup.json").read_text())
    assert result["backbone_ms"] > 0
    for r in result["records"]:
        assert r["head_share"] == pytest.approx(r["step_ms"] / (r["step_ms"] + result["backbone_ms"]))
    assert "head share" in (out / "speedup.md").read_text()


@pytest.mark.slow(reason="torchrun's agent and 2 workers; the 2-rank command is the default tier's case")
@pytest.mark.dist
def test_speedup_under_torchrun_uses_its_ranks(tmp_path):
    """Under a launcher (torchrun, the Slurm script) the command takes the launcher's ranks; rank 0 writes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_ERROR_FILE"}
    out = tmp_path / "sp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dsoft_dist.bench.speedup", "--classes", "2000", "--dim", "32", "--batch", "32",
                           "--rates", "1/8", "--repeats", "1", "--methods", "d_softmax,d_softmax_k",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert {r["ranks"] for r in records} == {2} and len(records) == 2
    assert proc.stdout.count("**C = 2,000, 2 ranks**") == 1  # printed once, by rank 0


def test_logit_cache_bench_alternates_both_budgets_in_one_run(capsys):
    from dsoft_dist.bench import logit_cache

    assert logit_cache.main(["--classes", "3000", "--dim", "16", "--batch", "32", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "logit_cache_mb=0: " in out and "logit_cache_mb=64: " in out and "recompute / cache: " in out
    with pytest.raises(ValueError, match="--batch 33 is not divisible by --nproc 2"):
        logit_cache.main(["--batch", "33", "--nproc", "2"])
