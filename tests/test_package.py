"""The package as users get it: `python -m build`, `twine check`, the files.

The sdist and the wheel are built from a copy of the source tree (building
writes `build/` and `*.egg-info`), checked with `twine check`, and opened:
the wheel must hold the dashboard's static files, `py.typed`, the
TensorBoard loader module and the license, and its metadata the extras the
docs name. `.ci/run` also installs the wheel into a fresh environment and
runs the demo from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.one_backend("tensorflow", reason="builds the package")


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):  # the test extra installs it: fail, never skip
            pytest.fail(f'{module} is not installed: pip install -e ".[test]"')
        pytest.skip(f"{module} is not installed (the test extra has it)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    _require("build")
    _require("twine")
    source = tmp_path_factory.mktemp("source")
    for name in ("keras_actgrad", "tests", "examples", "docs", "benchmarks"):
        shutil.copytree(
            ROOT / name,
            source / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    for name in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "mkdocs.yml",
        "noxfile.py",
        "tensorboard_plugin_actgrad.py",
    ):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    files = sorted(str(path) for path in dist.iterdir())
    assert len(files) == 2, files  # one sdist, one wheel
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_wheel_holds_what_users_need(dist):
    (wheel,) = dist.glob("keras_actgrad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(metadata).decode())
    static = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "keras_actgrad" / "_dashboard" / "static").iterdir()
        if path.is_file()
    )
    assert static, "the dashboard has no static files"
    assert set(static) <= names, set(static) - names
    assert "keras_actgrad/py.typed" in names
    assert "tensorboard_plugin_actgrad.py" in names
    assert any(name.endswith("licenses/LICENSE") for name in names), names
    assert not any(
        name.startswith(("tests/", "docs/", "benchmarks/")) for name in names
    )
    # The extras the docs name; [tensorflow] is the GPU-capable package.
    extras = set(meta.get_all("Provides-Extra"))
    assert {"tensorflow", "tensorflow-cpu", "jax", "torch", "report"} <= extras
    requires = meta.get_all("Requires-Dist")
    tensorflow = [r for r in requires if r.endswith('extra == "tensorflow"')]
    assert len(tensorflow) == 1 and tensorflow[0].startswith("tensorflow>="), tensorflow
    cpu = [r for r in requires if r.endswith('extra == "tensorflow-cpu"')]
    assert len(cpu) == 1 and cpu[0].startswith("tensorflow-cpu>="), cpu
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"


def test_the_sdist_builds_the_same_package(dist):
    (sdist,) = dist.glob("keras_actgrad-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE"} <= names
    assert "keras_actgrad/py.typed" in names
    assert "keras_actgrad/_dashboard/static/index.js" in names
