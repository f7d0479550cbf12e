"""The package's layout: no import circle, no `keras.src`, subpackages installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

PACKAGE = Path(__file__).resolve().parent.parent / "keras_actgrad"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """The keras_actgrad modules a file imports (anywhere in it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("keras_actgrad"):
                found.append(node.module)
                # `from keras_actgrad import _alerts` imports a module.
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if _exists(candidate):
                        found.append(candidate)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("keras_actgrad")]
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    base = PACKAGE / relative
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        # A package's `__init__` re-exports; importing a submodule runs the
        # parent packages' `__init__` files first, so count those edges too.
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def test_no_import_circle():
    graph = _graph()
    # The top-level `__init__` only re-exports; every other edge must form a DAG.
    graph.pop("keras_actgrad", None)
    for edges in graph.values():
        edges.discard("keras_actgrad")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_the_adapters_import_their_framework():
    allowed = {
        "tensorflow": {
            "_backends/tensorflow.py",
            "_backends/step_tensorflow.py",
            "_backends/replicas_tensorflow.py",
            "_statistics/moments_tensorflow.py",
        },
        "jax": {
            "_backends/jax.py",
            "_backends/step_jax.py",
            "_backends/replicas_jax.py",
            "_backends/processes_jax.py",
        },
        "torch": {
            "_backends/torch.py",
            "_backends/step_torch.py",
            "_backends/replicas_torch.py",
            "_statistics/moments_torch.py",
        },
    }
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in allowed and top != "tensorflow":
                    assert relative in allowed[top], f"{relative} imports {name}"
                if top == "tensorflow":
                    # The TensorBoard writer may use TensorFlow's record writer.
                    assert relative in allowed[top] | {"_tensorboard.py"}, (
                        f"{relative} imports {name}"
                    )
                assert not name.startswith("keras.src"), f"{relative} imports {name}"


def test_pyproject_packages_every_subpackage():
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    for init in PACKAGE.rglob("__init__.py"):
        name = _module_name(init)
        assert any(
            name == pattern
            or (pattern.endswith(".*") and name.startswith(pattern[:-1]))
            for pattern in include
        ), name
