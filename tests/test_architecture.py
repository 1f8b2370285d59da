"""Design rules that keep the code easy to see: checked, not just written down.

* no import cycles between our modules (module-level imports);
* the shared pieces (IO contract, preprocessing, NMS reference) depend on nothing of the exporter, torch
  or TensorRT, so every stage and every runtime can use them;
* TensorRT is only ever imported lazily (inside functions), so CPU users never need it;
* files stay small.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "runtimes")
SHARED = ("runtimes.contract", "runtimes.preprocess", "runtimes.nms_reference")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def _top_level_imports(name: str, path: Path) -> set[str]:
    """Modules imported at module level (not inside functions: those are the lazy imports)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in tree.body:
        nodes = [node]
        if isinstance(node, (ast.If, ast.Try)):
            nodes = list(ast.walk(node))
        for n in nodes:
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")
                    base = base[: len(base) - (n.level - 1)]
                    mod = ".".join(base + ([n.module] if n.module else []))
                    found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in n.names)
                else:
                    found.add(n.module)
                    found.update(f"{n.module}.{a.name}" for a in n.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _top_level_imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if dep.startswith(m + ".") or m.startswith(dep + "."):
                continue  # a package and its own submodules
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("shared", SHARED)
def test_shared_pieces_are_independent(shared):
    path = _modules().get(shared)
    if path is None:
        pytest.skip(f"{shared} not present")
    imports = _top_level_imports(shared, path)
    bad = {i for i in imports if i and i.split(".")[0] in ("exporter", "torch", "tensorrt", "onnx")}
    assert not bad, f"{shared} must stay importable without the exporter/torch/onnx/tensorrt: {sorted(bad)}"


def test_tensorrt_is_imported_lazily():
    offenders = [m for m, p in _modules().items()
                 if any(i == "tensorrt" or (i or "").startswith("tensorrt.") for i in _top_level_imports(m, p))]
    assert not offenders, f"module-level 'import tensorrt' in {offenders}"


def test_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"files over ~400 lines (split them): {big}"
