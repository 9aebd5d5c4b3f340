"""The one progress rule: bars on a terminal only, never in redirected output, log lines never glued to a bar.

    with progress_bar(total=n, desc="writing shards", unit="img") as bar:
        for item in items:
            ...
            bar.update(1)

``progress_bar`` draws a tqdm bar on stderr when stderr is a terminal and the caller did not
switch it off (``enabled=False``: ``--no-progress``, ``logging.progress: false``); redirected to
a file or a pipe it draws nothing, so logs stay one line per event. While a bar is drawn the
project's log handler (``observability.logging``) writes its lines above the bar instead of
onto it. ``bar.disable`` tells a caller whether to log a line in place of the bar.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def terminal() -> bool:
    """True when stderr (where bars and logs go) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", None)) and sys.stderr.isatty()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 **kwargs) -> tqdm:
    """A tqdm bar on stderr, drawn only on a terminal and when ``enabled`` (see the module doc)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and terminal()), file=sys.stderr,
                dynamic_ncols=True, **kwargs)
