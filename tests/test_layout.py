"""The package's import graph: no import circle, and the ARIA core never imports the other concerns.

The core is the flat top of `diffusers_aria/` (what `from diffusers_aria import X` serves, plus settings, rng,
reporting, ...); `cli.py` is an entry point, not core. The other concerns are subpackages: `utils` (imports
nothing else of the package), `teachers`, `training`, `publish`, `embedded`, `distillation`. Imports inside
functions count, as at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parents[1] / "diffusers_aria"
PKG = "diffusers_aria"
ENTRY_POINTS = {f"{PKG}.cli"}
CONCERNS = ("utils", "teachers", "training", "publish", "embedded", "distillation", "compare")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG_DIR.rglob("*.py"):
        parts = (PKG,) + path.relative_to(PKG_DIR).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package counts as its module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != PKG:  # the top package's lazy names resolve to core modules
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _concern(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in CONCERNS) else None


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_core_imports_only_the_core_and_utils():
    graph = import_graph()
    core = [m for m in graph if _concern(m) is None and m not in ENTRY_POINTS]
    assert {f"{PKG}.tracker", f"{PKG}.allocation", f"{PKG}.sampler", f"{PKG}.settings", PKG} <= set(core)
    wrong = {m: sorted(t for t in graph[m] if _concern(t) not in (None, "utils")) for m in core}
    assert not {m: t for m, t in wrong.items() if t}, "core modules import other concerns"
    assert not any(t in ENTRY_POINTS for m in core for t in graph[m])


def test_utils_import_nothing_else_of_the_package():
    graph = import_graph()
    wrong = {m: sorted(t for t in ts if _concern(t) != "utils") for m, ts in graph.items() if _concern(m) == "utils"}
    assert not {m: t for m, t in wrong.items() if t}


def test_the_graph_sees_real_edges():
    """The checks above are not vacuous: known edges are found (a relative import in a function included)."""
    graph = import_graph()
    assert f"{PKG}.teachers.families" in graph[f"{PKG}.training.step"]
    assert f"{PKG}.tracker" in graph[f"{PKG}.settings"]
    assert f"{PKG}.embedded.builtin_pool" in graph[f"{PKG}.training.inputs"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
