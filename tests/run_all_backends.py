"""Runs the test suite once per Keras backend and fails if any run fails.

Keras fixes its backend at import, so each backend gets its own pytest
process (`KERAS_BACKEND=tensorflow`, `jax`, `torch`). Extra arguments are
passed to pytest, e.g. `python tests/run_all_backends.py -x -k callback`.
Set `ACTGRAD_BACKENDS=jax,torch` to run a subset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    selected = os.environ.get("ACTGRAD_BACKENDS")
    backends = selected.split(",") if selected else list(BACKENDS)
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(
            f"Unknown backend(s) {unknown} in ACTGRAD_BACKENDS. Expected a "
            f"comma-separated subset of {list(BACKENDS)}. Received: {selected!r}.",
            file=sys.stderr,
        )
        return 2
    results: dict[str, tuple[int, float]] = {}
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    with tempfile.TemporaryDirectory() as reports:
        for backend in backends:
            print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            report = Path(reports) / f"{backend}.xml"
            start = time.perf_counter()
            code = subprocess.call(  # noqa: S603 - our own interpreter
                [sys.executable, "-m", "pytest", f"--junitxml={report}", *argv],
                cwd=ROOT,
                env=env,
            )
            results[backend] = (code, time.perf_counter() - start)
            for name, count in count_tests(report).items():
                totals[name] += count
    print("\n===== summary =====")
    for backend, (code, seconds) in results.items():
        status = "passed" if code == 0 else f"FAILED (pytest exit code {code})"
        print(f"{backend:<11} {status:<30} {seconds:7.0f} s")
    ok = all(code == 0 for code, _ in results.values())
    if not ok and totals["failed"] == 0:
        totals["failed"] = 1  # a run that failed without failing tests
    print(
        f"all-backends: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    return 0 if ok else 1


def count_tests(report: Path) -> dict[str, int]:
    """Passed, failed and skipped counts from a pytest JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not report.exists():
        return counts
    for suite in ElementTree.parse(report).getroot().iter("testsuite"):
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - skipped
    return counts


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
