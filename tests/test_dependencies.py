"""Package metadata stays true: every runtime import is declared (requirements.txt = pyproject dependencies), nothing
unused is declared, test-only tools stay in requirements-dev.txt, one Python floor, and no feature is advertised
before it exists."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys
import tomllib

from conftest import ROOT

RUNTIME = ("__init__.py", "portrait3d_core", "kernels", "nodes")     # what ComfyUI loads from the package
OWN = {"portrait3d_core", "portrait3d_kernels", "kernels", "nodes"}
# Provided by the host and deliberately not declared (see requirements.txt): ComfyUI's torch (and the triton CUDA
# builds of torch bring; optional) and ComfyUI's own modules.
HOST = {"torch", "triton", "comfy", "comfy_api", "comfy_execution", "folder_paths", "node_helpers", "server"}
TEST_ONLY = {"pygltflib", "pytest", "websocket-client"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0])


def _requirements(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as fh:
        lines = [line.split("#", 1)[0].strip() for line in fh]
    return {_requirement_name(line): line.replace(" ", "") for line in lines if line}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def _python_files():
    for entry in RUNTIME:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def _imports(tree):
    """``(top-level module name, lazy)`` per absolute import; lazy = inside a function body."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield from ((alias.name.split(".")[0], inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module.split(".")[0], inner
            yield from walk(child, inner)
    yield from walk(tree, False)


def runtime_imports(lazy: bool | None = None) -> dict:
    """Top-level module name → files importing it (absolute imports anywhere in the file; ``lazy=False`` keeps only
    module-level ones, ``lazy=True`` only those inside functions, None both)."""
    found = {}
    for path in _python_files():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for name, is_lazy in _imports(tree):
            if lazy is None or lazy == is_lazy:
                found.setdefault(name, set()).add(os.path.relpath(path, ROOT))
    return found


def _extras() -> dict:
    """Optional extras of pyproject: distribution name → extra name."""
    extras = _pyproject()["project"].get("optional-dependencies", {})
    return {_requirement_name(req): extra for extra, reqs in extras.items() for req in reqs}


def distribution_of(module: str):
    """The installed distribution providing top-level ``module`` (also single-file extension modules, which
    ``packages_distributions`` misses), or None."""
    providers = importlib.metadata.packages_distributions()
    if module in providers:
        return providers[module][0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    origin = os.path.realpath(spec.origin)
    for dist in importlib.metadata.distributions():
        if any(os.path.realpath(dist.locate_file(f)) == origin for f in dist.files or []):
            return dist.metadata["Name"]
    return None


def test_runtime_imports_are_declared_and_nothing_unused_is():
    third_party = {name: files for name, files in runtime_imports().items()
                   if name not in sys.stdlib_module_names and name not in OWN | HOST}
    dists = {name: distribution_of(name) for name in third_party}
    missing_dist = sorted(name for name, dist in dists.items() if dist is None)
    assert not missing_dist, f"imported but no installed distribution provides them: {missing_dist}"
    imported = {_normalise(dist): name for name, dist in dists.items()}
    declared = _requirements("requirements.txt")
    eager = runtime_imports(lazy=False)
    optional = {dist for dist in imported if dist in _extras() and imported[dist] not in eager}
    undeclared = {dist: sorted(third_party[imported[dist]]) for dist in imported
                  if dist not in declared and dist not in optional}
    assert not undeclared, (f"imported at runtime but not in requirements.txt / pyproject (or, imported lazily "
                            f"inside a function, in an optional extra): {undeclared}")
    unused = sorted(set(declared) - set(imported))
    assert not unused, f"declared as runtime dependencies but never imported by the package: {unused}"


def test_optional_extras_are_only_imported_lazily():
    """A dependency of an optional extra (``[cli]``, ``[align]``…) is imported only inside functions, so the package
    loads in ComfyUI without it and the feature says how to install it."""
    eager = runtime_imports(lazy=False)
    offenders = {}
    for module, files in eager.items():
        dist = distribution_of(module) if module not in sys.stdlib_module_names | OWN | HOST else None
        if dist and _normalise(dist) in _extras() and _normalise(dist) not in _requirements("requirements.txt"):
            offenders[module] = sorted(files)
    assert not offenders, f"optional-extra packages imported at module level: {offenders}"


def test_requirements_txt_and_pyproject_declare_the_same_dependencies():
    declared = _requirements("requirements.txt")
    pyproject = {_requirement_name(d): d.replace(" ", "") for d in _pyproject()["project"]["dependencies"]}
    assert pyproject == declared
    assert "torch" not in declared and "triton" not in declared        # the host's, never replaced


def test_test_only_tools_are_dev_requirements_only():
    dev, runtime = _requirements("requirements-dev.txt"), _requirements("requirements.txt")
    assert TEST_ONLY <= set(dev) and not TEST_ONLY & set(runtime)


def test_one_python_floor_everywhere():
    assert _pyproject()["project"]["requires-python"] == ">=3.11"
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as fh:
        assert "sys.version_info >= (3, 11)" in fh.read()
    with open(os.path.join(ROOT, "README.md")) as fh:
        assert "Python ≥ 3.11" in fh.read()


def test_metadata_does_not_advertise_text_to_3d_before_a_text_stage_exists():
    """A text stage is a node taking ComfyUI's CLIP or CONDITIONING; until one exists, no "text to 3D" claim."""
    sources = []
    for folder, _, files in os.walk(os.path.join(ROOT, "nodes")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as fh:
                    sources.append(fh.read())
    has_text_stage = any(re.search(r"io\.(Clip|Conditioning)\.Input", text) for text in sources)
    meta = _pyproject()
    claims = [meta["project"]["description"], meta["tool"]["comfy"]["DisplayName"]]
    advertised = [c for c in claims if re.search(r"text[\s-]*(to|→|->)\s*(full-head\s*)?(3d|360)", c, re.I)
                  and "in progress" not in c.lower()]
    assert has_text_stage or not advertised, f"advertises text to 3D, but no node takes text yet: {advertised}"
