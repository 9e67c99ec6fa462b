"""The package's shape: no import cycle (imports inside functions count), small modules, few top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_lite"
MAX_LINES = 450
MAX_TOP_LEVEL = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                # the deepest module of the package that the import names
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "qlora_lite":
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert "qlora_lite.training.run" in graph and graph["qlora_lite.training.run"], "the graph is empty"
    assert find_cycle(graph) is None


def test_no_module_over_the_size_limit():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_few_modules_directly_in_the_package():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= MAX_TOP_LEVEL, top


def test_public_functions_are_functions_and_old_module_paths_name_the_new_place():
    import importlib

    import pytest

    import qlora_lite
    from qlora_lite import compat

    assert all(
        callable(getattr(qlora_lite, name)) for name in ("train", "plan", "generate", "classify", "push")
    )
    for old, new in compat.MOVED_MODULES.items():
        with pytest.raises(ModuleNotFoundError, match=rf"qlora_lite\.{old} moved to qlora_lite\."):
            importlib.import_module(f"qlora_lite.{old}")
        for module in {w.rstrip(".,;:)") for w in new.split() if w.startswith("qlora_lite.")}:
            importlib.import_module(module)  # every new place named exists
    with pytest.raises(ModuleNotFoundError, match="moved to qlora_lite.inference.generation"):
        exec("from qlora_lite.generate import Generator", {})
    with pytest.raises(ModuleNotFoundError, match="qlora_lite.training.api"):
        exec("import qlora_lite.train", {})
    assert callable(qlora_lite.train) and qlora_lite.train.__module__ == "qlora_lite.training.api"


def test_names_of_the_old_flat_modules_that_are_packages_now_keep_working(tmp_path):
    import pytest

    from qlora_lite.errors import UserError

    namespace: dict = {}
    with pytest.warns(DeprecationWarning, match="moved to qlora_lite.hub.push.resolve_adapter"):
        exec("from qlora_lite.hub import resolve_adapter, push", namespace)
    with pytest.warns(DeprecationWarning, match="qlora_lite.checkpoint.store.CheckpointStore"):
        exec("from qlora_lite.checkpoint import CheckpointStore", namespace)
    from qlora_lite.checkpoint.store import CheckpointStore

    assert namespace["CheckpointStore"] is CheckpointStore
    # `push` was a function of the old hub module: calling it still runs the real push.
    with pytest.raises(UserError, match="run_record.json|not a run folder|no adapter"):
        namespace["push"](tmp_path, "alice/repo")
    with pytest.raises(ImportError):
        exec("from qlora_lite.hub import no_such_name", {})
