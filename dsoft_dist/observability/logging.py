"""The project's one logger: ``get_logger(__name__)`` everywhere, never ``print``.

Messages go to stderr with the rank prefixed when torch.distributed runs more than one rank
(``[rank 1]``), so multi-process runs stay readable and single-process logs carry no rank. While
a progress bar is drawn (``observability.progress``) a line is written above the bar, never onto
it. ``DSOFT_LOG_LEVEL`` sets the level (default INFO).
"""
from __future__ import annotations

import logging
import os
import sys

_ROOT = "dsoft_dist"
_configured = False


class _RankFilter(logging.Filter):
    """Adds ``record.rank_prefix``: "[rank R] " in a group of several ranks, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = ""
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                prefix = f"[rank {dist.get_rank()}] "
        except Exception:  # logging must never raise
            pass
        record.rank_prefix = prefix
        return True


class _BarAwareHandler(logging.StreamHandler):
    """A stderr handler that writes above an open tqdm bar (tqdm.write) instead of onto its line."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # no bar can be open before tqdm is imported
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure() -> None:
    global _configured
    if _configured:
        return
    handler = _BarAwareHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank_prefix)s%(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
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
