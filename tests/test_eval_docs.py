"""The Python examples in docs/eval.md and docs/models.md run as written."""
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def blocks(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("name", ["eval.md", "models.md"])
def test_doc_examples_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    found = blocks(name)
    assert len(found) >= 2
    for code in found:
        exec(compile(code, f"{name}-example", "exec"), {"__name__": "__doc_example__"})  # noqa: S102
    assert capsys.readouterr().out  # the examples print their results
