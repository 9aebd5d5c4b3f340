"""Shared test setup: deterministic CPU threads, a free-port helper for gloo runs."""
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():  # Triton picks interpreter vs compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT in spawned gloo tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
