"""``dsoft doctor`` in-process: a clean run passes, and each planted problem gives exit 1 and its FAIL line."""
import re
import socket
from collections import namedtuple

import pytest

from dsoft_dist.cli import main
from dsoft_dist.launch import doctor
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
    argv = ["doctor", "--set", f"checkpoint.dir={ckpt or tmp_path / 'ckpt'}"]
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
    for name in ("versions", "gpus", "network", "rendezvous", "hostname", "port", "ckpt-folder", "ckpt-shared",
                 "disk"):
        line(out, name)
    markers = [p.name for p in (tmp_path / "ckpt").iterdir()]
    assert markers == [doctor.MARKER_PREFIX + doctor._safe_host(socket.gethostname())]
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
    existing = next(iter(doctor.interfaces()))
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
    monkeypatch.setattr(doctor, "disk_usage", lambda path: usage(2 ** 40, 2 ** 40 - 2 ** 30, 2 ** 30))
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512")
    assert rc == 1, out
    assert line(out, "disk").startswith("FAIL") and "1.00 GiB free" in line(out, "disk")
    monkeypatch.setattr(doctor, "disk_usage", lambda path: usage(2 ** 50, 0, 2 ** 49))
    rc, out = run(capsys, tmp_path, "--set", "data.num_classes=1000000", "--set", "model.embedding_size=512")
    assert line(out, "disk").startswith("ok"), out
