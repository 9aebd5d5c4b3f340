"""The Python example in docs/head.md runs as written.

    python -m pytest tests/test_head_docs.py
"""
from __future__ import annotations

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "head.md"


def test_head_doc_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/head.md lost its python example"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "docs_head"})
