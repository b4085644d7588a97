"""The package's import graph: imports point one way (down the layers of docs/architecture.md),
no cycles, and no package module imported inside a function (unless the line says why with
`# lazy: <reason>`)."""

from __future__ import annotations

import ast
import fnmatch
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stego_jax")

# Lowest first; a module may import its own layer and the layers above it in this list.
LAYERS = [
    ("leaves", ["stego_jax", "stego_jax.cli", "stego_jax.run_config", "stego_jax.testing", "stego_jax.ops", "stego_jax.config", "stego_jax.parallel", "stego_jax.metrics",
                "stego_jax.kmeans", "stego_jax.crf", "stego_jax.losses", "stego_jax.data", "stego_jax.data.*"]),
    ("models", ["stego_jax.models", "stego_jax.models.*"]),
    ("weights", ["stego_jax.weights", "stego_jax.weights.*"]),
    ("model", ["stego_jax.model", "stego_jax.featurizers"]),
    ("steps", ["stego_jax.steps", "stego_jax.featurize"]),
    ("sources", ["stego_jax.knn", "stego_jax.feature_cache", "stego_jax.feature_sources"]),
    ("run", ["stego_jax.checkpoints", "stego_jax.writers", "stego_jax.viz"]),
    ("programs", ["stego_jax.train", "stego_jax.evaluate", "stego_jax.predict", "stego_jax.demo",
                  "stego_jax.official", "stego_jax.sweep"]),
]


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported dotted name refers to (a name inside a module -> the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: str) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, source line) for each import of the package."""
    src = open(path).read()
    lines = src.splitlines()
    tree = ast.parse(src)
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            nested = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for n in names:
                target = _resolve(n) if n.startswith("stego_jax") else None
                if target:
                    out.append((target, child.lineno, in_func, lines[child.lineno - 1]))
            visit(child, nested)

    visit(tree, False)
    return out


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: place it in LAYERS (and docs/architecture.md)")


GRAPH = {m: {t for t, _, in_func, _ in _imports(p) if not in_func and t != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_imports_point_down_the_layers():
    bad = []
    for m, targets in GRAPH.items():
        for t in targets:
            if t == "stego_jax":
                continue
            if _layer(t) > _layer(m):
                bad.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_unexplained_function_level_imports():
    bad = [f"{os.path.relpath(p, os.path.dirname(PKG))}:{line}: {text.strip()}"
           for m, p in MODULES.items() for _, line, in_func, text in _imports(p)
           if in_func and "# lazy:" not in text]
    assert not bad, "imports of package modules inside functions:\n" + "\n".join(bad)


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path):
    """The graph walk is not vacuous: a planted upward import and a function-level import are found."""
    src = tmp_path / "m.py"
    src.write_text("from stego_jax.train import train_and_evaluate\n\ndef f():\n    import stego_jax.ops\n")
    found = _imports(str(src))
    assert ("stego_jax.train", 1, False) == found[0][:3]
    assert ("stego_jax.ops", 4, True) == found[1][:3]
    assert _layer("stego_jax.train") > _layer("stego_jax.steps")
