"""pyproject.toml declares what the package imports, and nothing it does not.

Core dependencies must each be imported by stego_jax; every third-party module stego_jax imports
must be declared, in the core list or in an extra (an optional import, guarded where it is
used); every package of an extra must be imported by stego_jax or the tests, unless it is a
tool (pytest's plug-ins) or another build of a core package (jax[cuda12], jax[tpu]).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Distribution name (normalized: lower case, '-' for '_' and '.') -> top-level import name, where
# the two differ.
IMPORT_NAME = {
    "pillow": "PIL",
    "absl-py": "absl",
    "ml-collections": "ml_collections",
    "orbax-checkpoint": "orbax",
    "tensorboardx": "tensorboardX",
    "array-record": "array_record",
    "pydensecrf2": "pydensecrf",
    "scikit-image": "skimage",
    "ml-dtypes": "ml_dtypes",
}
# Extras' packages that are tools, not imports.
TOOLS = {"pytest-xdist"}


def _normalize(requirement: str) -> tuple[str, str]:
    """'jax[cuda12]>=0.6' -> ('jax', 'jax'): the distribution name and its import name."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    dist = re.sub(r"[-_.]+", "-", name).lower()
    return dist, IMPORT_NAME.get(dist, dist.replace("-", "_"))


def _project() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _imports(paths) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in `paths` (module level or inside
    functions) -> the files importing them. Standard library and stego_jax left out."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "stego_jax":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _package_imports() -> dict[str, set[str]]:
    return _imports(sorted((ROOT / "stego_jax").rglob("*.py")))


def _test_imports() -> dict[str, set[str]]:
    # The fixture writer runs in a separate torch environment (see its docstring).
    return _imports(p for p in sorted((ROOT / "tests").rglob("*.py")) if p.parent.name != "fixtures")


def test_normalize_maps_distributions_to_import_names():
    assert _normalize("jax[cuda12]>=0.6") == ("jax", "jax")
    assert _normalize("orbax-checkpoint>=0.11") == ("orbax-checkpoint", "orbax")
    assert _normalize("ml_dtypes>=0.4") == ("ml-dtypes", "ml_dtypes")
    assert _normalize("Pillow>=10") == ("pillow", "PIL")
    assert _normalize("msgpack") == ("msgpack", "msgpack")


def test_imports_are_found_at_module_level_and_inside_functions():
    found = _package_imports()
    assert "stego_jax/data/prepared.py" in found["msgpack"]
    assert "stego_jax/crf.py" in found["pydensecrf"]  # imported inside a function: optional
    assert "os" not in found and "stego_jax" not in found


def test_every_core_dependency_is_imported_by_the_package():
    imported = _package_imports()
    unused = [req for req in _project()["dependencies"] if _normalize(req)[1] not in imported]
    assert not unused, f"declared in [project] dependencies but never imported by stego_jax: {unused}"


def test_every_import_of_the_package_is_declared():
    project = _project()
    declared = {_normalize(r)[1] for r in project["dependencies"]}
    for reqs in project.get("optional-dependencies", {}).values():
        declared |= {_normalize(r)[1] for r in reqs}
    missing = {m: sorted(files) for m, files in _package_imports().items() if m not in declared}
    assert not missing, f"imported by stego_jax but not declared in pyproject.toml: {missing}"


def test_every_package_of_an_extra_is_used():
    project = _project()
    core = {_normalize(r)[1] for r in project["dependencies"]}
    used = set(_package_imports()) | set(_test_imports())
    unused = {}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for req in reqs:
            dist, module = _normalize(req)
            if dist in TOOLS or module in core:  # a tool, or another build of a core package
                continue
            if module not in used:
                unused.setdefault(extra, []).append(req)
    assert not unused, f"extras with packages nothing imports: {unused}"


def test_extras_are_imported_only_where_used():
    """A module of an extra is never imported at a module's top level, so every stego_jax module
    imports with the core dependencies alone (crf's pydensecrf backend, testing's skimage)."""
    project = _project()
    core = {_normalize(r)[1] for r in project["dependencies"]}
    extras = {_normalize(r)[1] for reqs in project.get("optional-dependencies", {}).values()
              for r in reqs} - core
    eager = []
    for path in sorted((ROOT / "stego_jax").rglob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:  # top-level statements only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            eager += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in extras]
    assert not eager, f"extras imported at module level: {eager}"
