"""The library's import graph: no circles, and the floors of the house in the right order.

Imports are read with `ast` from every module of megatron/early_exit, including imports
inside functions (a lazy import still ties two modules together). `from a import b` counts
as importing the module a.b when that module exists, else the package a (its __init__).
The implicit import of a module's parent package is not counted: it is how Python loads
packages, not a dependency this code chose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron.early_exit"

# Nothing here may import training/: they stand on the runtime layer (checkpoint/, model/,
# platform/) that training stands on too.
NO_TRAINING = ("inference", "server", "convert", "tuning")
# The ground floor imports nothing from the floors above it.
GROUND = ("errors", "flags", "progress", "assets", "platform", "data")
ABOVE_GROUND = (
    "config", "arguments", "model", "pipeline", "checkpoint", "training", "tuning",
    "inference", "server", "convert", "cli",
)  # fmt: skip


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "megatron" / "early_exit").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def _area(module: str) -> str:
    rest = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    return rest.split(".")[0]


@pytest.fixture(scope="module")
def graph():
    return import_graph(_modules())


def test_the_graph_sees_lazy_imports(graph):
    # loading.py imports the checkpoint store inside a function only.
    assert f"{PACKAGE}.checkpoint.store" in graph[f"{PACKAGE}.inference.loading"]


def test_no_import_circles(graph):
    circles = find_circles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_inference_server_convert_tuning_do_not_import_training(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if _area(m) in NO_TRAINING
        for t in targets
        if _area(t) == "training"
    )
    assert not bad, "imports of training/: " + ", ".join(bad)


def test_ground_floor_imports_nothing_above_it(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if _area(m) in GROUND
        for t in targets
        if _area(t) in ABOVE_GROUND
    )
    assert not bad, "ground-floor modules importing upper floors: " + ", ".join(bad)


def test_circle_finder_finds_circles(tmp_path):
    # The checks above can fail: a planted circle and a planted training import are found.
    pkg = tmp_path / "megatron" / "early_exit"
    for sub in ("inference", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "inference" / "a.py").write_text(
        "def f():\n    from megatron.early_exit.inference import b\n"
    )
    (pkg / "inference" / "b.py").write_text(
        "from . import a\nimport megatron.early_exit.training\n"
    )
    graph = import_graph(_modules(tmp_path))
    assert find_circles(graph) == [[f"{PACKAGE}.inference.a", f"{PACKAGE}.inference.b"]]
    assert f"{PACKAGE}.training" in graph[f"{PACKAGE}.inference.b"]
