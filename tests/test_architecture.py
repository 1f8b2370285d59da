"""Design rules that keep the code easy to see: checked, not just written down.

Layers, lowest first; every import, lazy ones (inside functions) included, points down or sideways:

0. bottom: IO contract, errors, ONNX metadata, artifact writing/hashing, preprocessing, NMS references
   (``runtimes/contract.py``, ``errors.py``, ``metadata.py``, ``files.py``, ``preprocess.py``,
   ``nms_reference.py``; ``exporter/errors.py`` and ``exporter/artifacts.py`` build on them);
1. model: the safe loader, our modules, fusion (``exporter/checkpoint*|safe_pickle|weights_check|model|modules*|
   heads*|fuse|loading``);

2. runtimes: the backends and ``Detector`` (``runtimes/*``); a runtime may load a checkpoint through the
   model layer, never through the pipeline or a stage;
3. evaluation: dataset, mAP, parity, latency (``exporter/evaluation/``), used by precision and the harness;
4. stages: export, NMS tail, precision, TensorRT build, Triton, options;
5. top: the pipeline, the check harness/report (``exporter/check/``) and the three CLIs.

Also: no import cycles at all; TensorRT is only ever imported lazily; files stay small.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "runtimes")
SHARED = ("runtimes.contract", "runtimes.preprocess", "runtimes.nms_reference", "runtimes.errors",
          "runtimes.metadata", "runtimes.files")

# module-name patterns per layer (first match wins; unknown modules: runtimes.* -> 2, exporter.* -> 4)
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("exporter", "runtimes", "exporter.errors", "exporter.artifacts") + SHARED),
    (1, ("exporter.checkpoint*", "exporter.safe_pickle", "exporter.weights_check", "exporter.model",
         "exporter.modules*", "exporter.heads*", "exporter.fuse", "exporter.loading")),

    (5, ("exporter.pipeline", "exporter.cli", "exporter.check", "exporter.check.*", "runtimes.cli")),
    (3, ("exporter.evaluation", "exporter.evaluation.*")),
    (2, ("runtimes.*",)),
    (4, ("exporter.*",)),
]
LAYER_NAMES = {0: "bottom", 1: "model", 2: "runtimes", 3: "evaluation", 4: "stages", 5: "top"}
# what a runtime (anything under runtimes/, its CLI included) must never import
RUNTIME_FORBIDDEN = ("exporter.pipeline", "exporter.cli", "exporter.check", "exporter.check.*", "exporter.precision",
                     "exporter.precision.*", "exporter.onnx_export", "exporter.nms_tail", "exporter.trt_build",
                     "exporter.evaluation", "exporter.evaluation.*")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, lazy: bool = True) -> set[str]:
    """Modules imported by a file: at module level, and with ``lazy`` also inside functions and classes."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    if lazy:
        nodes = list(ast.walk(tree))
    else:  # module level only: top-level statements and what sits under a top-level if/try
        nodes = []
        for node in tree.body:
            nodes += list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [node]
    for n in nodes:
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[: len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in n.names)
    return found


def _top_level_imports(name: str, path: Path) -> set[str]:
    return _imports(name, path, lazy=False)


def _graph() -> dict[str, set[str]]:
    """Our modules -> our modules they import (lazy imports included; a package's own submodules excluded)."""
    mods = _modules()
    graph = {}
    for m, p in mods.items():
        deps = {i for i in _imports(m, p) if i in mods and i != m}
        graph[m] = {d for d in deps if not (d.startswith(m + ".") or m.startswith(d + "."))}
    return graph


def _layer(module: str) -> int:
    for level, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(module, pat) for pat in patterns):
            return level
    raise AssertionError(f"no layer for {module}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_sees_lazy_imports():
    """The rules below are only as good as the graph: an import inside a function must be an edge."""
    graph = _graph()
    assert "exporter.check.harness" in graph["exporter.pipeline"], "pipeline imports the harness lazily (--check)"


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_point_downward():
    graph = _graph()
    bad = [f"{m} ({LAYER_NAMES[_layer(m)]}) -> {d} ({LAYER_NAMES[_layer(d)]})"
           for m in sorted(graph) for d in sorted(graph[m]) if _layer(d) > _layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_bottom_layer_imports_nothing_above_it():
    graph = _graph()
    bad = [f"{m} -> {d}" for m in sorted(graph) if _layer(m) == 0 for d in sorted(graph[m]) if _layer(d) != 0]
    assert not bad, "the bottom layer must import nothing of ours above it:\n" + "\n".join(bad)


def test_runtimes_never_import_the_pipeline_or_a_stage():
    graph = _graph()
    bad = [f"{m} -> {d}" for m in sorted(graph) if m.startswith("runtimes.") for d in sorted(graph[m])
           if any(fnmatch.fnmatchcase(d, pat) for pat in RUNTIME_FORBIDDEN)]
    assert not bad, "a runtime loads models through the model layer only:\n" + "\n".join(bad)


def test_precision_never_imports_the_check_harness():
    """Stage 4 (precision) sits below stage 6 (check): INT8 recovery uses the evaluation library instead."""
    graph = _graph()
    bad = [f"{m} -> {d}" for m in sorted(graph) if m.startswith("exporter.precision") for d in sorted(graph[m])
           if d == "exporter.check" or d.startswith("exporter.check.")]
    assert not bad, "\n".join(bad)


def test_layer_rules_catch_a_violation():
    """The checks above must be able to fail: a planted upward import and a planted circle are found."""
    graph = {m: set(d) for m, d in _graph().items()}
    graph["runtimes.contract"].add("exporter.pipeline")
    assert _cycles(graph), "a bottom module importing the pipeline closes a circle"
    assert _layer("exporter.pipeline") > _layer("runtimes.contract")
    assert _layer("runtimes.onnx_backend") == 2 and _layer("exporter.evaluation.evaluate") == 3
    assert _layer("exporter.precision.int8") == 4 and _layer("exporter.check.harness") == 5


@pytest.mark.parametrize("shared", SHARED)
def test_shared_pieces_are_independent(shared):
    path = _modules().get(shared)
    if path is None:
        pytest.skip(f"{shared} not present")
    imports = _imports(shared, path)
    bad = {i for i in imports if i and i.split(".")[0] in ("exporter", "torch", "tensorrt", "onnx")}
    assert not bad, f"{shared} must stay importable without the exporter/torch/onnx/tensorrt: {sorted(bad)}"


def test_tensorrt_is_imported_lazily():
    offenders = [m for m, p in _modules().items()
                 if any(i == "tensorrt" or (i or "").startswith("tensorrt.") for i in _top_level_imports(m, p))]
    assert not offenders, f"module-level 'import tensorrt' in {offenders}"


def test_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"files over ~400 lines (split them): {big}"
