"""The layers of docs/architecture.md hold: no module imports from a higher layer (at the top of a
file or inside a function), and no modules import each other in a loop."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "booster"


def layers() -> dict[str, int]:
    """Top-level module or package name -> its layer (1 = the ground), from docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return {name: i for i, line in enumerate(block.group(1).splitlines(), 1) for name in line.split()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The name the layer list uses: ``booster.stages.align`` -> ``stages``; the package -> ``booster``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> list[tuple[str, int]]:
    """(booster module imported, line) for every import in the file, nested ones included."""
    module = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names] + [(base, node.lineno)]
    return [(name, line) for name, line in found if name.split(".")[0] == "booster"]


def resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, list[tuple[str, int]]] = {}
    for module, path in files.items():
        targets = [(resolve(name, set(files)), line) for name, line in imports(path)]
        edges[module] = list(dict.fromkeys((t, line) for t, line in targets if t and t != module))
    return files, edges


def test_every_module_has_a_layer():
    known = layers()
    files, _ = graph()
    assert sorted({unit(m) for m in files} - set(known)) == []


def upward_imports() -> list[str]:
    """``file:line: ...`` for every import of a module from a higher layer."""
    known = layers()
    files, edges = graph()
    return [
        f"{files[m].relative_to(SRC.parent)}:{line}: {unit(m)} (layer {known[unit(m)]}) imports {t} "
        f"(layer {known[unit(t)]})"
        for m, targets in edges.items()
        for t, line in targets
        if t != "booster" and known[unit(t)] > known[unit(m)]
    ]


def test_no_module_imports_from_a_higher_layer():
    upward = upward_imports()
    assert upward == [], "\n".join(upward)


def test_the_data_layer_never_imports_evaluation():
    """One case of the rule above, checked on its own: loaders read task constants from booster.tasks."""
    _, edges = graph()
    found = [(m, t) for m, targets in edges.items() for t, _ in targets if m.startswith("booster.data")]
    assert ("booster.data.hub", "booster.tasks") in found  # the scan sees these imports
    assert not [pair for pair in found if pair[1].startswith("booster.evaluation")]


def test_no_modules_import_each_other_in_a_loop():
    _, edges = graph()
    successors = {m: {t for t, _ in targets if t != "booster"} for m, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in successors[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in successors:
        if v not in index:
            visit(v)
    assert loops == []


def test_the_check_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    """A stage importing the pipeline inside a function is named with its file and line."""
    fake = tmp_path / "booster"
    (fake / "stages").mkdir(parents=True)
    (fake / "pipeline.py").write_text("def run_pipeline():\n    pass\n")
    (fake / "stages" / "x.py").write_text(
        "import os\n\n\ndef f():\n    from booster.pipeline import run_pipeline\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert upward_imports() == ["booster/stages/x.py:5: stages (layer 8) imports booster.pipeline (layer 11)"]
