"""Runs the test suite once per Keras backend and fails if any run fails.

Keras fixes its backend at import, so each backend gets its own pytest
process (`KERAS_BACKEND=tensorflow`, `jax`, `torch`). Extra arguments are
passed to pytest, e.g. `python tests/run_all_backends.py -x -k callback`.
Set `ACTGRAD_BACKENDS=jax,torch` to run a subset.

The backends run at once (`ACTGRAD_JOBS`, default all of them;
`ACTGRAD_JOBS=1` runs them one after another with live output). Most of a
test's time is one Python thread tracing and building models, so on two
cores the suite takes far less than the three runs in a row, and no core
idles while the last backend finishes. Each run's output is printed whole
when it ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

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
    jobs = _jobs(len(backends))
    if jobs is None:
        return 2
    results: dict[str, tuple[int, float]] = {}
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    with tempfile.TemporaryDirectory() as reports:
        folder = Path(reports)
        waiting = list(backends)
        running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
        while waiting or running:
            while waiting and len(running) < jobs:
                backend = waiting.pop(0)
                running[backend] = _start(backend, argv, folder, quiet=jobs > 1)
            if jobs > 1:
                time.sleep(1.0)
            for backend, (process, start, log) in list(running.items()):
                if jobs > 1 and process.poll() is None:
                    continue
                code = process.wait()
                results[backend] = (code, time.perf_counter() - start)
                del running[backend]
                if log is not None:  # the whole run at once, not interleaved
                    log.close()
                    print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
                    text = (folder / f"{backend}.log").read_bytes()
                    sys.stdout.write(text.decode("utf-8", errors="replace"))
                    sys.stdout.flush()
                for name, count in count_tests(folder / f"{backend}.xml").items():
                    totals[name] += count
    print("\n===== summary =====")
    for backend in backends:
        code, seconds = results[backend]
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


def _jobs(count: int) -> int | None:
    """How many backends run at once: `ACTGRAD_JOBS`, else all of them."""
    value = os.environ.get("ACTGRAD_JOBS", str(count))
    if not value.isdigit() or int(value) < 1:
        print(
            f"ACTGRAD_JOBS must be a positive integer (the number of backends "
            f"tested at once; 1 runs them one after another). Received: {value!r}.",
            file=sys.stderr,
        )
        return None
    return int(value)


def _start(
    backend: str, argv: list[str], folder: Path, quiet: bool
) -> tuple[subprocess.Popen[bytes], float, Any]:
    """Starts pytest for one backend; its output to a log file when `quiet`."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    log = open(folder / f"{backend}.log", "wb") if quiet else None  # noqa: SIM115
    if not quiet:
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
    process = subprocess.Popen(  # noqa: S603 - our own interpreter
        [sys.executable, "-m", "pytest", f"--junitxml={folder / backend}.xml", *argv],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if quiet else None,
    )
    return process, time.perf_counter(), log


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
