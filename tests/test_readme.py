"""The README: one screen, its Quickstart what CI runs, its links alive.

Its ```python blocks run in `tests/test_docs.py`, with every docs page.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def quickstart_commands(text: str) -> list[str]:
    """The command lines of the first fenced block of the Quickstart section,
    as `.ci/run` reads them (comment and blank lines dropped)."""
    section = re.search(
        r"^#+[^\n]*quick ?start[^\n]*\n(.*?)(?=^#)", text + "\n#", re.S | re.M | re.I
    )
    assert section, "README has no Quickstart section"
    block = re.search(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    assert block, "README's Quickstart section has no fenced block"
    return [
        line
        for line in block.group(1).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_readme_is_one_screen():
    assert len(README.splitlines()) <= 250


def test_quickstart_is_the_demo_then_the_tests():
    commands = quickstart_commands(README)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert '".[demo]"' in demo and "examples/quickstart.py" in demo
    assert '".[test]"' in tests and "tests/run_all_backends.py" in tests


def test_ci_runs_the_quickstart_test_command():
    # .ci/run extracts the command with its own embedded Python; run that
    # extraction and compare.
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    extractor = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert extractor, ".ci/run no longer extracts the README's command"
    done = subprocess.run(
        ["python3", "-c", extractor.group(1)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == quickstart_commands(README)[1]


def test_relative_links_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
