"""The package's import graph: no cycles, and each layer imports only the layers below it (docs/design.md).

Every import counts, at module level or inside a function (a function-level import only hides a cycle), except
those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "saelab"

LAYERS = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "saes": {"core"},
    "activations": {"core", "data", "models"},
    "io": {"core", "saes"},
    "splice": {"core", "models", "saes"},
    "evals": {"core", "data", "models", "saes", "activations", "splice", "analysis"},  # auto-interp reads statistics
    "training": {"core", "data", "models", "saes", "activations", "io", "splice", "evals"},
    "analysis": {"core", "data", "models", "saes", "activations", "io", "splice"},
    "synthetic": {"core", "saes", "activations", "training"},
    "runs": {"core", "data", "models", "saes", "activations", "io", "splice", "evals", "training", "synthetic"},
}
"""What each part of saelab may import besides itself. The top (saelab/__init__.py, cli/) may import anything."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """The saelab modules `name` imports anywhere in its code (a `from x import y` of a submodule y counts as y)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("saelab"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("saelab"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for other in sorted(GRAPH[name]):
            if state.get(other) == "open":
                cycle = stack[stack.index(other) :] + [other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def _part(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, imported in GRAPH.items():
        part = _part(name)
        if part not in LAYERS:
            continue
        for other in imported:
            other_part = _part(other)
            if other_part != part and other_part not in LAYERS[part]:
                wrong.append(f"{name} imports {other}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(name) for name in MODULES} - {None, "cli"}
    assert parts <= set(LAYERS), f"parts of saelab missing from LAYERS: {sorted(parts - set(LAYERS))}"


def test_the_walker_sees_function_level_imports():
    """A cycle hidden in a function body must still count (the reason this test exists)."""
    assert "saelab.io.load" in GRAPH["saelab.io.publish"]
    assert any(m.startswith("saelab.saes") for m in GRAPH["saelab.io.load"])
