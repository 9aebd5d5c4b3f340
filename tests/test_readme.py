"""The README's contract: two set-up commands first, the CI script runs the second, snippets run."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_exactly_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert README.startswith("# dsoft-dist\n\n```bash\n")  # the commands open the README
    demo, tests = first_block
    assert demo.startswith("python3.11 -m venv .venv") and demo.endswith("dsoft demo")
    assert tests.startswith("python3.11 -m venv .venv") and "pytest" in tests
    for cmd in first_block:  # torch first, from the CPU wheel, before anything depending on it
        assert cmd.index("torch==2.13.0") < cmd.index("pip install -q -e")


def run_snippet_without_warnings(snippet: str) -> subprocess.CompletedProcess:
    """Runs a README snippet in a fresh interpreter where any warning (ours or torch's) is an error."""
    return subprocess.run([sys.executable, "-W", "error", "-c", snippet], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_python_snippets_in_readme_run():
    snippets = re.findall(r"```python\n(.*?)```", README, re.S)
    assert any("DSoftmaxLoss" in s for s in snippets)  # "Use the loss in your own trainer"
    for snippet in snippets:
        proc = run_snippet_without_warnings(snippet)
        assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr


def test_ci_script_uses_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -E '^python3\\.11 -m venv ' README.md" in ci
    assert len(re.findall(r"^python3\.11 -m venv ", README, re.M)) == 2


def test_python_snippets_in_docs_run():
    for name in ("losses.md", "config.md", "data.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        snippets = re.findall(r"```python\n(.*?)```", text, re.S)
        assert snippets, name
        for snippet in snippets:
            proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT,
                                  timeout=300)
            assert proc.returncode == 0, f"{name}: {proc.stderr}"
