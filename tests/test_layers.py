"""The import layers of docs/design.md ("Layers"): every import of the package goes to its own unit, to a unit
to its left in its row, or to a lower layer; and no two units import each other, directly or through others.

Imports are read from the source with ``ast`` (module level and inside functions alike), so a lazy import
counts: it is still a dependency. Each module belongs to a unit: its package under ``dsoft_dist`` (the
package's ``cli.py`` too) or, for a top-level module, the module itself; ``kernels/`` is ``dsoft_dist.kernels``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCES = {"dsoft_dist": ROOT / "dsoft_dist", "dsoft_dist.kernels": ROOT / "kernels"}


def layer_table() -> dict[str, float]:
    """{unit: rank} from the table of docs/design.md's "Layers" section: the row's layer number plus a
    fraction for the unit's place in its row (a unit may import the units to its left)."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, units in re.findall(r"^\|\s*(\d+)\s*\|([^|]+)\|", section, re.M):
        for place, unit in enumerate(units.split(",")):
            layers[unit.strip().strip("`")] = int(number) + place / 100
    return layers


def unit_of(module: str) -> str:
    """'dsoft_dist.train.trainer' -> 'train'; 'dsoft_dist.errors' -> 'errors'; 'dsoft_dist' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name."""
    modules = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            modules[".".join((prefix, *rel))] = path
    return modules


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package in ``path`` (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "dsoft_dist" or name.startswith("dsoft_dist.")]


def import_edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, 'file:line imports name') across units."""
    edges = []
    for module, path in package_modules().items():
        for line, name in imports_of(module, path):
            src, dst = unit_of(module), unit_of(name)
            if src != dst:
                edges.append((src, dst, f"{path.relative_to(ROOT)}:{line} imports {name}"))
    return edges


def cycles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    layers = layer_table()
    units = {unit_of(m) for m in package_modules()}
    assert units - set(layers) == set(), "units missing from docs/design.md's layer table"
    assert set(layers) - units == set(), "the layer table names units that do not exist"


def test_no_import_goes_up_a_layer():
    layers = layer_table()
    upward = [f"{where} ({src} -> {dst}: {dst} is above {src} or to its right in docs/design.md's table)"
              for src, dst, where in import_edges() if layers[dst] > layers[src]]
    print(f"{len(import_edges())} imports across units checked against {len(layers)} units in "
          f"{1 + int(max(layers.values()))} layers")
    assert upward == [], "imports that go up a layer:\n" + "\n".join(upward)


def test_no_two_packages_import_each_other():
    found = cycles(import_edges())
    assert found == [], f"package cycles: {found}"


def test_the_checks_can_fail(tmp_path):
    """The walker sees function-level and relative imports, and both checks flag what they should."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dsoft_dist.cli import main\nfrom ..train import trainer\n")
    assert sorted(name for _, name in imports_of("dsoft_dist.data.m", source)) == ["dsoft_dist.cli", "dsoft_dist.train"]
    layers = layer_table()
    assert layers["cli"] > layers["data"] and layers["train"] > layers["data"] and layers["bench"] > layers["plan"]
    assert cycles([("a", "b", ""), ("b", "c", ""), ("c", "a", ""), ("c", "d", "")]) == [["a", "b", "c"]]


@pytest.mark.parametrize("unit", ["errors", "utils", "registry"])
def test_the_bottom_layer_imports_only_itself(unit):
    layers = layer_table()
    assert int(layers[unit]) == 0
    assert [w for src, dst, w in import_edges() if src == unit and layers[dst] >= 1] == []
