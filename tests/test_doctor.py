"""``dsoft doctor`` in-process: a clean run passes, and each planted problem gives exit 1 and its FAIL line."""
import re
import socket
from collections import namedtuple

import pytest

from dsoft_dist.cli import main
from dsoft_dist.launch import doctor_checks
from dsoft_dist.parallel import free_port

LAYOUT_VARS = ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NODE_RANK", "SLURM_NODEID", "MASTER_ADDR",
               "MASTER_PORT", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    """The job layout comes from each test's options only, not from the shell that runs pytest."""
    for name in LAYOUT_VARS:
        monkeypatch.delenv(name, raising=False)


def run(capsys, tmp_path, *extra, ckpt=None):
    """``dsoft doctor`` with the checkpoint folder under tmp_path and a free port unless given: (rc, stdout)."""
    argv = ["doctor", "--set", f"checkpoint.dir={ckpt or tmp_path / 'ckpt'}", "--set",
            f"logging.output_dir={tmp_path / 'run'}"]
    if "--master-port" not in extra:
        argv += ["--master-port", str(free_port())]
    rc = main(argv + list(extra))
    return rc, capsys.readouterr().out


def line(out: str, name: str) -> str:
    """The report line of check ``name`` (exactly one)."""
    found = [ln for ln in out.splitlines() if re.match(rf"(ok|warn|FAIL)\s+{re.escape(name)}\s", ln)]
    assert len(found) == 1, out
    return found[0]


def test_clean_run_passes_and_leaves_a_marker(capsys, tmp_path):
    rc, out = run(capsys, tmp_path)
    assert rc == 0, out
    assert "FAIL" not in out
    for name in ("versions", "gpus", "network", "rendezvous", "hostname", "port", "data", "run-folder",
                 "ckpt-folder", "ckpt-shared", "disk"):
        line(out, name)
    markers = [p.name for p in (tmp_path / "ckpt").iterdir()]
    assert markers == [doctor_checks.MARKER_PREFIX + doctor_checks._safe_host(socket.gethostname())]
    assert re.search(r"^dsoft doctor: (all checks passed|\d+ problems? \(0 blocking\))$", out, re.M), out


def test_folder_beneath_a_file_fails_naming_it(capsys, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    folder = tmp_path / "afile" / "ckpt"
    rc, out = run(capsys, tmp_path, ckpt=folder)
    assert rc == 1, out
    assert line(out, "ckpt-folder").startswith("FAIL") and str(folder) in line(out, "ckpt-folder")
    assert re.search(r"^dsoft doctor: \d+ problems? \([1-9]\d* blocking\)$", out, re.M), out


def test_port_in_use_fails_on_node_rank_0_only(capsys, tmp_path):
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        rc, out = run(capsys, tmp_path, "--master-port", str(port))
        assert rc == 1, out
        assert line(out, "port").startswith("FAIL") and str(port) in line(out, "port")
        rc, out = run(capsys, tmp_path, "--master-port", str(port), "--node-rank", "1")
        assert rc == 0, out
        assert line(out, "port").startswith("ok") and "not needed on node rank 1" in line(out, "port")


def test_loopback_master_addr_fails_with_two_nodes(capsys, tmp_path):
    rc, out = run(capsys, tmp_path, "--master-addr", "127.0.0.1", "--nnodes", "2")
    assert rc == 1, out
    assert line(out, "rendezvous").startswith("FAIL")
    assert "scontrol show hostnames $SLURM_JOB_NODELIST | head -1" in line(out, "rendezvous")
    assert line(out, "ckpt-shared").startswith("warn")  # only this host has written its marker
    rc, out = run(capsys, tmp_path, "--master-addr", "127.0.0.1", "--nnodes", "1")
    assert rc == 0, out
    assert line(out, "rendezvous").startswith("ok")


def test_nnodes_from_slurm_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "3")
    rc, out = run(capsys, tmp_path, "--master-addr", "127.0.0.1")
    assert rc == 1 and "SLURM_NNODES" in line(out, "rendezvous"), out


def test_interface_variable_naming_a_missing_interface_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuchif0")
    rc, out = run(capsys, tmp_path)
    assert rc == 1, out
    assert line(out, "network").startswith("FAIL") and "nosuchif0" in line(out, "network")
    existing = next(iter(doctor_checks.interfaces()))
    assert existing in line(out, "network")  # the fix names the interfaces there are


def _estimate_gib(out: str) -> float:
    return float(re.search(r"one checkpoint ~ ([\d.]+) GiB", line(out, "disk")).group(1))


def test_disk_estimate_matches_the_arithmetic(capsys, tmp_path):
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512",
                  "--set", "optimizer.name=sgd", "--set", "optimizer.momentum=0.9")
    head_bytes = 1_000_000 * 512 * 4 * 2  # fp32 weights + the SGD momentum buffer
    assert _estimate_gib(out) == pytest.approx(head_bytes / 2 ** 30, rel=0.10), out
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512",
                  "--set", "optimizer.name=adamw")
    assert _estimate_gib(out) == pytest.approx(1_000_000 * 512 * 4 * 3 / 2 ** 30, rel=0.10), out


def test_too_little_free_space_fails(capsys, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor_checks, "disk_usage", lambda path: usage(2 ** 40, 2 ** 40 - 2 ** 30, 2 ** 30))
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512")
    assert rc == 1, out
    assert line(out, "disk").startswith("FAIL") and "1.00 GiB free" in line(out, "disk")
    monkeypatch.setattr(doctor_checks, "disk_usage", lambda path: usage(2 ** 50, 0, 2 ** 49))
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512")
    assert line(out, "disk").startswith("ok"), out


def test_a_missing_manifest_fails_the_data_check(capsys, tmp_path):
    rc, out = run(capsys, tmp_path, "--set", "data.source=webdataset", "--set", "data.manifest=nope/manifest.json",
                  "--set", "eval.synthetic_identities=0")
    assert rc == 1, out
    assert line(out, "data").startswith("FAIL") and "nope/manifest.json" in line(out, "data"), out


def test_shards_the_manifest_lists_must_exist(capsys, tmp_path):
    from dsoft_dist.data.convert import synth_to_shards

    synth_to_shards(str(tmp_path / "shards"), num_identities=4, samples_per_identity=3, image_size=16, per_shard=6,
                    progress=False)
    manifest = tmp_path / "shards" / "manifest.json"
    rc, out = run(capsys, tmp_path, "--set", "data.source=webdataset", "--set", f"data.manifest={manifest}",
                  "--set", "data.num_classes=4", "--set", "data.image_size=16", "--set", "eval.synthetic_identities=0")
    assert line(out, "data").startswith("ok") and "2 shards, 12 samples, 4 classes" in line(out, "data"), out
    (tmp_path / "shards" / "train-000001.tar").unlink()
    rc, out = run(capsys, tmp_path, "--set", "data.source=webdataset", "--set", f"data.manifest={manifest}",
                  "--set", "data.num_classes=4", "--set", "data.image_size=16", "--set", "eval.synthetic_identities=0")
    assert rc == 1 and line(out, "data").startswith("FAIL") and "1 of 2 shard files" in line(out, "data"), out


def test_a_folder_holding_another_run_fails_the_run_folder_check(capsys, tmp_path):
    from dsoft_dist.config import config_from_dict
    from dsoft_dist.config.demo import DEMO_CONFIG
    from dsoft_dist.train.runfolder import write_run_record

    cfg = config_from_dict({**DEMO_CONFIG, "logging": {"output_dir": str(tmp_path / "run")},
                            "checkpoint": {"resume": "auto"}})
    write_run_record(cfg)
    keep = ("--resume", "auto")
    rc, out = run(capsys, tmp_path, *keep)
    assert line(out, "run-folder").startswith("ok") and "continues the run" in line(out, "run-folder"), out
    rc, out = run(capsys, tmp_path, "--overwrite")
    assert "the run it holds is deleted first" in line(out, "run-folder"), out
    rc, out = run(capsys, tmp_path, *keep, "--set", "head.loss=d_softmax_paper")
    assert rc == 1 and line(out, "run-folder").startswith("FAIL"), out
    assert "head.loss: 'd_softmax' -> 'd_softmax_paper'" in line(out, "run-folder"), out


def test_a_manifest_without_the_webdataset_source_is_refused(capsys, tmp_path):
    rc = main(["doctor", "--set", "data.manifest=nope/manifest.json"])
    assert rc == 2 and "set data.source=webdataset" in capsys.readouterr().err
