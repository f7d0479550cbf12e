"""The declared minimum versions are the ones the compatibility run tests.

Three places name them: `pyproject.toml` (what pip enforces), `noxfile.py`
(what the "oldest" compatibility session installs) and the version table of
the docs (what users read). They must agree, and the table's "newest
tested" column must name the versions this suite runs on.
"""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "versions.md"

# Table row label -> distribution names whose floors it states.
ROWS = {
    "Keras": ["keras"],
    "TensorFlow": ["tensorflow", "tensorflow-cpu"],
    "JAX": ["jax"],
    "PyTorch": ["torch"],
    "TensorBoard": ["tensorboard"],
    "NumPy": ["numpy"],
    "matplotlib": ["matplotlib"],
}


def _floors() -> dict[str, str]:
    """{distribution: minimum} from pyproject's dependencies and extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9.]+)", requirement)
        if match:
            floors[match.group(1).lower()] = match.group(2)
    return floors


def _oldest() -> dict[str, str]:
    """noxfile.py's OLDEST (read without importing nox)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id == "OLDEST":
            return ast.literal_eval(node.value)
    raise AssertionError("noxfile.py has no OLDEST")


def _table() -> dict[str, tuple[str, str]]:
    """{row label: (oldest, newest)} of the docs' version table."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3:
            label = re.sub(r"\s*\(.*", "", cells[0])
            rows[label] = (cells[1], cells[2])
    return rows


def _version(cell: str) -> str:
    match = re.match(r"[0-9][0-9.]*", cell)
    assert match, cell
    return match.group(0)


def test_pyproject_floors_are_the_oldest_tested_versions():
    floors, oldest = _floors(), _oldest()
    for label, names in ROWS.items():
        key = names[0]
        for name in names:
            assert floors.get(name) == oldest[key], (
                f"pyproject.toml declares {name}>={floors.get(name)}, but the "
                f"compatibility run tests {key}=={oldest[key]} (noxfile.py OLDEST)"
            )
        assert _version(_table()[label][0]) == oldest[key], label


def test_the_table_names_the_versions_this_suite_runs_on():
    table = _table()
    for label, names in ROWS.items():
        for name in names:
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            installed = installed.split("+")[0]
            oldest, newest = (_version(cell) for cell in table[label])
            # The main suite runs the newest; the compatibility run the oldest.
            assert any(
                installed.split(".")[:2] == version.split(".")[:2]
                for version in (newest, oldest)
            ), (
                f"{name} {installed} is installed, but docs/reference/versions.md "
                f"says {label} is tested at {oldest} and {newest}: update the table"
            )
