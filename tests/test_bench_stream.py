"""`dsoft bench stream` at toy size: every row is measured and the memory columns come from real workers."""
import json

from dsoft_dist.cli import main


def test_bench_stream_runs_at_toy_size_and_reports_every_row(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "stream", "--identities", "300", "--workers", "0,2", "--per-shard", "100",
                 "--batch-size", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("bare raw bytes", "bare tarfile members", "bare tarstream members", "loader, in the main process",
                "loader, 2 workers"):
        assert row in text
    result = json.loads(out.read_text())["results"]["300"]
    assert result["samples"] == 600 and result["shards"] == 6
    two = result["loader"]["2"]
    # at this toy size a worker may finish its 300 samples and exit before the first reading: 1 or 2 are listed
    assert 1 <= len(two["workers"]) <= 2 and all(w["private_mb"] > 0 for w in two["workers"])
    assert two["steps"] == 600 // 64 and two["steady_per_s"] > 0 and two["start_s"] > 0
