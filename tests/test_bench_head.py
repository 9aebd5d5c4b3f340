"""The head-step benchmark's table: one row per sample rate, eff paired per repeat with its own reference.

    python -m pytest tests/test_bench_head.py
"""
from __future__ import annotations

import json
import statistics

from dsoft_dist.bench import head as bench_head


def _table(capsys, argv):
    assert bench_head.main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_table_rows_and_paired_efficiency(capsys):
    lines = _table(capsys, ["--classes", "3000", "--dim", "32", "--batch", "16", "--sample-rates", "1", "0.25",
                            "--repeats", "3", "--warmup", "1", "--no-validate"])
    rows = [line.split() for line in lines[2:4]]
    assert [r[0] for r in rows] == ["1", "0.25"] and [r[1] for r in rows] == ["all", "random"]
    assert [int(r[2]) for r in rows] == [3000, 750]  # K per rank
    times = {part.split(":")[0].strip(): [float(t) for t in part.split(":")[1].split(",")]
             for part in lines[4].removeprefix("step times (s): ").split(";")}
    effs = {part.split(":")[0].strip(): [float(e) for e in part.split(":")[1].split(",")]
            for part in lines[5].removeprefix("eff per repeat (%): ").split(";")}
    assert len(times["r=1"]) == len(effs["r=1"]) == 3
    for row, key in zip(rows, ("r=1", "r=0.25")):
        step, eff = float(row[3]), float(row[9])
        assert abs(step - statistics.median(times[key])) < 1.5e-3
        assert abs(eff - statistics.median(effs[key])) < 0.11  # the column is the median of the paired ratios
        assert 0 < eff < 200


def test_nearest_rows_count_the_table_and_the_lookup(tmp_path, capsys):
    out = tmp_path / "nearest.json"
    lines = _table(capsys, ["--classes", "300", "--dim", "16", "--batch", "8", "--sample-rates", "1", "0.25",
                            "--negatives", "nearest", "--nearest-per-class", "4", "--repeats", "1", "--warmup", "1",
                            "--json", str(out)])
    assert [line.split()[1] for line in lines[2:4]] == ["all", "nearest"]  # r = 1 runs all: a head per rate
    rows = json.loads(out.read_text())["rows"]
    weights_and_momentum = 2 * 300 * 16 * 4
    assert rows[0]["state"] == weights_and_momentum and rows[0]["nearest_pairs"] is None
    assert rows[1]["state"] == weights_and_momentum + 300 * 4 * (8 + 4)  # + the table's ids and cosines
    assert rows[1]["k"] == 75 and rows[1]["nearest_pairs"] == 8 * 4  # one rank: B M pairs


def test_nearest_needs_a_warmup_step(capsys):
    assert bench_head.main(["--classes", "300", "--negatives", "nearest", "--warmup", "0"]) == 2
    assert "--warmup 0 is invalid with --negatives nearest" in capsys.readouterr().err
