"""No import circle between the modules of bora_pyro (results import reports, never the reverse;
data never imports plots), read from the source with ``ast``: imports at module level and inside
functions count alike."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bora_pyro"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` of every module under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``.

    ``import a.b`` and ``from a import b`` (``b`` a submodule) point to ``a.b``; ``from a import
    name`` (``name`` not a submodule) points to ``a`` (its ``__init__``). Relative imports are
    resolved against the importing module's package. The parent packages Python initialises
    before a submodule are not edges (importing ``a.b`` from inside ``a`` never re-enters ``a``).
    """
    modules = _modules(root)
    top = root.name
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edges.add(sub if sub in modules else source)
        graph[name] = {e for e in edges if e.split(".")[0] == top and e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]``, or ``None`` (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_bora_pyro():
    graph = import_graph()
    assert "bora_pyro.reports.arviz" in graph and "bora_pyro.result" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_reports_do_not_import_the_result_module():
    graph = import_graph()
    reports = [m for m in graph if m.startswith("bora_pyro.reports")]
    assert {m for m in reports if "bora_pyro.result" in graph[m]} == set()


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"__init__.py": "from .b import f\n", "b.py": "def f():\n    from . import c\n", "c.py": "from .b import f\n"},
         ["pkg.b", "pkg.c", "pkg.b"]),
        ({"__init__.py": "from .b import f\n__version__ = '1'\n", "b.py": "def f():\n    from . import __version__\n"},
         ["pkg", "pkg.b", "pkg"]),
        ({"__init__.py": "", "b.py": "import pkg.c\n", "c.py": "import os\n"}, None),
        ({"__init__.py": "", "sub/__init__.py": "from ..b import f\n", "b.py": "def f():\n    from .sub import g\n"},
         ["pkg.b", "pkg.sub", "pkg.b"]),
    ],
)
def test_the_checker_finds_function_level_and_package_cycles(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert find_cycle(graph) == expected
