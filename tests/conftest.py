"""Shared test setup: deterministic CPU threads, the Triton interpreter without CUDA, a free-port fixture."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton picks interpreter vs compiler at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsoft_dist.parallel import free_port  # noqa: E402  (after the interpreter switch)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def port() -> int:
    return free_port()
