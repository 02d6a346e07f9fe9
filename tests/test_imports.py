"""The package's import structure: what `import gradwatch` loads, and no cycles between modules.

The cycle check reads the source with `ast` (nothing is imported), so an import hidden
inside a function counts like one at the top of a module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

import gradwatch

SRC = Path(gradwatch.__file__).resolve().parent.parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = SRC, package: str = "gradwatch") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its source (top level,
    inside functions, under ``if TYPE_CHECKING``), read with :mod:`ast`.

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``. The
    implicit import of a module's parent packages is not an edge: it would make every
    submodule import whatever its package's ``__init__`` re-exports.
    """
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package, then up
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else target)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def import_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The shortest chain of imports from ``start`` to ``goal``; None if there is none."""
    before: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        if here == goal:
            path = [here]
            while (prev := before[path[-1]]) is not None:
                path.append(prev)
            return path[::-1]
        for nxt in sorted(graph.get(here, ())):
            if nxt not in before:
                before[nxt] = here
                todo.append(nxt)
    return None


def import_cycle(a: str, b: str, graph: dict[str, set[str]] | None = None) -> list[str] | None:
    """A chain of imports ``a -> ... -> b -> ... -> a`` (direct or through other modules);
    None when at least one of the two modules does not reach the other.

    Raises:
        KeyError: ``a`` or ``b`` is not a module of the package.
    """
    graph = import_graph() if graph is None else graph
    for name in (a, b):
        if name not in graph:
            raise KeyError(f"{name!r} is not a module under {SRC}; expected one of {sorted(graph)}")
    there, back = import_path(graph, a, b), import_path(graph, b, a)
    if there is None or back is None:
        return None
    return there + back[1:]


# --- the checker itself ----------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_import_cycle_sees_function_level_relative_and_indirect_imports(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import x\n",
        "pkg/a.py": "x = 1\ndef f():\n    from . import b\n",
        "pkg/b.py": "from pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert import_cycle("pkg.a", "pkg.b", graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert import_cycle("pkg.a", "pkg.d", graph) is None  # d imports a; a never reaches d
    with pytest.raises(KeyError, match="'pkg.nope' is not a module"):
        import_cycle("pkg.a", "pkg.nope", graph)


# --- the package -----------------------------------------------------------------------------


def test_lab_runner_and_vectorized_have_no_import_cycle():
    graph = import_graph()
    assert "gradwatch.lab.runner" not in graph["gradwatch.lab.vectorized"]
    assert import_cycle("gradwatch.lab.runner", "gradwatch.lab.vectorized", graph) is None
    assert import_cycle("gradwatch.lab.tasks", "gradwatch.lab.vectorized", graph) is None
    assert import_cycle("gradwatch.lab.tasks", "gradwatch.lab.runner", graph) is None


def test_theory_is_mathematics_only():
    graph = import_graph()
    for engine in ("gradwatch.watch", "gradwatch.store"):
        assert import_path(graph, "gradwatch.theory", engine) is None, engine


def test_import_gradwatch_does_not_load_the_lab():
    code = ("import sys, gradwatch; "
            "print(','.join(sorted(m for m in sys.modules if m == 'gradwatch.lab' "
            "or m.startswith('gradwatch.lab.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "", f"import gradwatch loaded {out.stdout.strip()}"


def test_watch_and_diagnose_have_no_import_cycle():
    """Data flows one way: hooks -> recorder -> store -> readers (the watcher never imports a reader)."""
    graph = import_graph()
    assert import_cycle("gradwatch.watch", "gradwatch.diagnose", graph) is None
    # (watch(ui=True) starts the live page, a reader in a thread of its own: that import is the one)
    for reader in ("gradwatch.diagnose", "gradwatch.report", "gradwatch.lab.runner", "gradwatch.prescribe"):
        assert import_path(graph, "gradwatch.watch", reader) is None, reader
    for engine in ("gradwatch.recorder", "gradwatch.thresholds", "gradwatch.config"):
        assert import_path(graph, engine, "gradwatch.watch") is None, engine
