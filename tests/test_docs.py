"""The documentation site: every ```python block runs, the site builds.

Each page of `docs/` (and README.md) is run as a user would read it: its
```python blocks in order, in one fresh namespace (a later block may use an
earlier one's names), in a subprocess whose working directory is a
temporary one. Fenced blocks of other languages (```bash, ```text) are not
run. The pages about backends run under every backend, the others in one
backend's suite each (`EVERY_BACKEND`, `ONE_BACKEND`), to keep CI's time.

`mkdocs build --strict` (the docs extra, part of the test extra) builds the
site: a broken link, a page missing from the nav or a docstring that does
not render fails it. The API reference must document every public name.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)

# Pages whose code is about the backend itself, or that a user runs first:
# every backend's suite runs them.
EVERY_BACKEND = ("README.md", "docs/getting-started.md", "docs/guides/backends.md")
# The other pages run in one backend's suite each (the API under them is
# tested on every backend by the other tests), spread so that each suite
# gets a share of the costly ones; a page not listed here goes to a backend
# by its position in the list of pages.
BACKENDS = ("tensorflow", "jax", "torch")
ONE_BACKEND = {
    "docs/guides/probes.md": "tensorflow",  # a KerasHub GPT-2
    "docs/recipes/vanishing-gradients.md": "tensorflow",  # two 8-layer CNNs
    "docs/guides/production.md": "tensorflow",
    "docs/recipes/kerashub-lora.md": "jax",  # a KerasHub model fine-tuned
    "docs/guides/tensorboard.md": "jax",  # the report's heatmap (matplotlib)
    "docs/guides/callback.md": "jax",
    "docs/recipes/grad-cam.md": "torch",  # keras.applications MobileNetV3
    "docs/guides/monitor.md": "torch",
    "docs/guides/statistics.md": "torch",
    "docs/recipes/large-probe-batches.md": "torch",
}

# Runs each block with `exec` in one namespace; on failure names the block
# and its line before the traceback.
_RUNNER = """
import sys, traceback
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for number, (line, code) in enumerate(blocks, 1):
    try:
        exec(compile(code, f"{page} (block {{number}}, line {{line}})", "exec"),
             namespace)
    except BaseException:
        print(f"{page}: python block {{number}}, starting at line {{line}}, "
              "failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """[(first code line number, code), ...] of the ```python blocks, in order."""
    blocks = []
    for fence in _FENCE.finditer(text):
        if fence.group(1) == "python":
            line = text.count("\n", 0, fence.start(2)) + 1
            blocks.append((line, fence.group(2)))
    return blocks


def pages() -> list[str]:
    """README.md and every Markdown page of docs/, as paths relative to ROOT."""
    found = ["README.md"] + sorted(
        path.relative_to(ROOT).as_posix() for path in DOCS.rglob("*.md")
    )
    return [page for page in found if python_blocks(_read(page))]


def _read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def test_python_blocks_parser():
    text = (
        "# A page\n```python\na = 1\n```\n"
        "```bash\nls\n```\n```text\nnot code\n```\n"
        "```python\nprint(a)\n```\n"
    )
    assert python_blocks(text) == [(3, "a = 1\n"), (12, "print(a)\n")]
    # The real docs: the pages users read first have code to run.
    assert {"README.md", "docs/getting-started.md"} <= set(pages())
    assert set(ONE_BACKEND) <= set(pages()), "ONE_BACKEND names a page with no code"
    assert set(EVERY_BACKEND) <= set(pages())


def _page_param(page: str, index: int) -> object:
    if page in EVERY_BACKEND:
        return page
    backend = ONE_BACKEND.get(page, BACKENDS[index % len(BACKENDS)])
    return pytest.param(
        page, marks=pytest.mark.one_backend(backend, reason="a docs page's code")
    )


@pytest.mark.parametrize(
    "page", [_page_param(page, index) for index, page in enumerate(pages())]
)
def test_page_python_blocks_run(page, tmp_path):
    script = tmp_path / "blocks.py"
    script.write_text(
        _RUNNER.format(blocks=python_blocks(_read(page)), page=page),
        encoding="utf-8",
    )
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def api_reference_targets() -> dict[str, str]:
    """{name: dotted path} of the `::: path` directives of the API page."""
    text = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    paths = re.findall(r"^::: (\S+)\s*$", text, re.M)
    return {path.rpartition(".")[2]: path for path in paths}


def test_api_reference_documents_every_public_name():
    import keras_actgrad

    targets = api_reference_targets()
    public = set(keras_actgrad.__all__) - {"__version__"}
    assert public - set(targets) == set(), "public names missing from the API page"
    assert set(targets) - public == set(), "the API page documents private names"
    for name, path in targets.items():
        module, _, attribute = path.rpartition(".")
        documented = getattr(importlib.import_module(module), attribute)
        assert documented is getattr(keras_actgrad, name), (name, path)
        assert documented.__doc__, f"{name} has no docstring"


def _mkdocs_available() -> bool:
    try:
        importlib.import_module("mkdocs")
        importlib.import_module("mkdocstrings_handlers.python")
        importlib.import_module("material")
    except ImportError:
        return False
    return True


@pytest.mark.one_backend("torch", reason="the site does not depend on the backend")
def test_mkdocs_build_strict(tmp_path):
    if not _mkdocs_available():
        # CI installs the test extra, which includes the docs tooling: there,
        # a missing mkdocs is a failure, never a skip.
        if os.environ.get("CI"):
            pytest.fail('mkdocs is not installed: pip install -e ".[test]"')
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]")')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    # The API reference holds every public name with its docstring's summary.
    api = (tmp_path / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    # Compared without whitespace: tags split "`save`/`load`" into "save / load".
    text = re.sub(r"\s+", "", html.unescape(re.sub(r"<[^>]+>", " ", api)))
    for name, path in api_reference_targets().items():
        assert f'id="{path}"' in api, f"{name}: no heading {path!r} in the API page"
        module, _, attribute = path.rpartition(".")
        doc = getattr(importlib.import_module(module), attribute).__doc__
        summary = re.sub(r"[\s`*]+", "", doc.strip().splitlines()[0])
        assert summary in text, f"{name}: docstring summary {summary!r} not rendered"
