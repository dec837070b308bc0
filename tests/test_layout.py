"""The package's layout: layers whose imports only go downward (import-linter's contract in
pyproject.toml, function-level imports included), no import cycle anywhere, modules a reader can hold
in their head, and Triton kernels that import nothing of fastat above them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra (pip install -e '.[test]')"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def _cycles(graph) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), i.e. every cycle."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_anywhere():
    grimp = pytest.importorskip("grimp")  # installed with import-linter
    graph = grimp.build_graph("fastat")  # counts imports inside functions too
    # a package's __init__ importing its own modules is not a cycle a reader has to untangle
    for m in list(graph.modules):
        for imported in list(graph.find_modules_directly_imported_by(m)):
            if imported.startswith(m + "."):
                graph.remove_import(importer=m, imported=imported)
    assert _cycles(graph) == []


def test_the_cycle_detector_finds_a_cycle():
    grimp = pytest.importorskip("grimp")
    graph = grimp.ImportGraph()
    for m in ("p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    assert _cycles(graph) == []
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*ROOT.glob("fastat/**/*.py"), *ROOT.glob("kernels/*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}


def test_kernels_import_nothing_of_fastat_above_them():
    """``kernels/`` is installed as ``fastat.kernels`` (outside the tree import-linter reads), so its
    place at the bottom is checked here: it imports only itself."""
    bad = []
    for p in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{p.name}: {n}" for n in names if n.startswith("fastat") and not n.startswith("fastat.kernels")]
    assert bad == []
