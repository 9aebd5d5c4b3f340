"""The project's log lines: no rank prefix in a single process, and never glued onto a progress bar.

The bar test runs a real process whose stderr is a terminal (a pseudo-terminal), as a user's is.
"""
from __future__ import annotations

import logging
import re
import sys

from dsoft_dist.observability import get_logger
from tests.terminal import on_a_terminal

BAR_AND_LOG = """
import sys, time
from tqdm import tqdm
from dsoft_dist.observability import get_logger
from tests.terminal import on_a_terminal
log = get_logger("dsoft_dist.check")
bar = tqdm(total=3, desc="training", file=sys.stderr, mininterval=0)
bar.update(1)
log.info("MIDDLE LINE")
bar.update(2)
bar.close()
"""


def test_a_log_line_is_written_above_an_open_bar_not_onto_it():
    rc, out = on_a_terminal([sys.executable, "-c", BAR_AND_LOG])
    assert rc == 0, out
    assert "training" in out and "MIDDLE LINE" in out, out
    # the line starts where the terminal's cursor was sent back (bar cleared), not after the bar's text
    assert re.search(r"(^|[\r\n])\d\d:\d\d:\d\d (\[rank [^]]*\] )?INFO dsoft_dist\.check: MIDDLE LINE", out), repr(out)


def test_a_single_process_logs_no_rank():
    handler = get_logger().handlers[0]
    record = logging.LogRecord("dsoft_dist.check", logging.INFO, __file__, 1, "hello", None, None)
    for f in handler.filters:
        f.filter(record)
    line = handler.format(record)
    assert line.endswith("INFO dsoft_dist.check: hello") and "rank" not in line, line
