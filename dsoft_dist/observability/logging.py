"""The project's one logger: ``get_logger(__name__)`` everywhere, never ``print``.

Messages go to stderr with the rank prefixed when torch.distributed is initialized,
so multi-process runs stay readable. ``DSOFT_LOG_LEVEL`` sets the level (default INFO).
"""
from __future__ import annotations

import logging
import os
import sys

_ROOT = "dsoft_dist"
_configured = False


class _RankFilter(logging.Filter):
    """Adds ``record.rank`` ("-" before torch.distributed is initialized)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = "-"
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank = str(dist.get_rank())
        except Exception:  # logging must never raise
            pass
        record.rank = rank
        return True


def _configure() -> None:
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger(_ROOT)
    root.addHandler(handler)
    root.setLevel(os.environ.get("DSOFT_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    _configured = True


def get_logger(name: str = _ROOT) -> logging.Logger:
    """Returns a logger under the ``dsoft_dist`` hierarchy, configured once."""
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
