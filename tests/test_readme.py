"""Every ```python snippet in README.md runs.

The README is split into its sections (the `<!-- section: NAME ... -->`
markers). A section's snippets run in order in one fresh namespace (a later
snippet may use an earlier one's names), in a subprocess whose working
directory is a temporary one. Other fenced blocks (```bash, ```text) are not
run: the Quickstart's commands are what `.ci/run` executes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_MARKER = re.compile(r"^<!-- section: (\S+) \(owner: [^)]*\) -->$", re.M)
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)

# Runs each snippet with `exec` in one namespace; on failure names the
# snippet and its README line before the traceback.
_RUNNER = """
import sys, traceback
snippets = {snippets!r}
namespace = {{"__name__": "__main__"}}
for number, (line, code) in enumerate(snippets, 1):
    try:
        exec(compile(code, f"README.md (snippet {{number}}, line {{line}})", "exec"),
             namespace)
    except BaseException:
        print(f"README snippet {{number}} of section {section!r}, starting at line "
              f"{{line}}, failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def readme_sections(text: str) -> dict[str, list[tuple[int, str]]]:
    """{section name: [(first code line number, code), ...]} in README order."""
    markers = list(_MARKER.finditer(text))
    bounds = [("intro", 0)] + [(m.group(1), m.end()) for m in markers]
    sections: dict[str, list[tuple[int, str]]] = {}
    for i, (name, start) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else len(text)
        snippets = []
        for fence in _FENCE.finditer(text, start, end):
            if fence.group(1) == "python":
                line = text.count("\n", 0, fence.start(2)) + 1
                snippets.append((line, fence.group(2)))
        sections[name] = snippets
    return sections


with open(README, encoding="utf-8") as file:
    SECTIONS = readme_sections(file.read())


def test_parser_finds_the_snippets():
    text = (
        "intro\n```python\na = 1\n```\n"
        "<!-- section: one (owner: x) -->\n```bash\nls\n```\n"
        "```python\nb = 2\n```\n```python\nprint(b)\n```\n"
        "<!-- section: two (owner: y, z) -->\nno code\n"
    )
    assert readme_sections(text) == {
        "intro": [(3, "a = 1\n")],
        "one": [(10, "b = 2\n"), (13, "print(b)\n")],
        "two": [],
    }
    # The real README: sections are found, and ours has snippets to run.
    assert {"quickstart", "api", "report"} <= set(SECTIONS)
    assert SECTIONS["report"]
    assert SECTIONS["quickstart"] == []  # the bash block is not run here


# Each section's snippets (a fresh process, 20-35 s) run in one backend's
# suite, the sections spread over the three; the API under them is tested on
# every backend by the other tests.
_BACKENDS = ("tensorflow", "jax", "torch")


@pytest.mark.parametrize(
    "section",
    [
        pytest.param(
            name,
            marks=pytest.mark.one_backend(
                _BACKENDS[index % len(_BACKENDS)], reason="a README section's run"
            ),
        )
        for index, name in enumerate(
            name for name, snippets in SECTIONS.items() if snippets
        )
    ],
)
def test_readme_section_snippets_run(section, tmp_path):
    script = tmp_path / "snippets.py"
    script.write_text(
        _RUNNER.format(snippets=SECTIONS[section], section=section), encoding="utf-8"
    )
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
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
