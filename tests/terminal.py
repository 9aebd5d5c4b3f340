"""A command run with its stderr on a pseudo-terminal, as a user's shell runs it: what progress bars and
log lines look like there (tests of the progress rule: bars on a terminal only, log lines above them).

    rc, drawn = on_a_terminal([DSOFT, "data", "from-folder", src, out])
"""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

DSOFT = os.path.join(os.path.dirname(sys.executable), "dsoft")


def on_a_terminal(argv: list[str], columns: int = 100, timeout: float = 120, **popen) -> tuple[int, str]:
    """Runs ``argv`` with stderr on a ``columns``-wide pseudo-terminal (a 0-column one gets no bar) and stdin
    and stdout closed; returns (exit code, everything written to the terminal)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, **popen)
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # EIO: the process closed its side of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode("utf-8", "replace")
