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
import time
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
    for backend in backends:
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        start = time.perf_counter()
        code = subprocess.call(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "pytest", *argv], cwd=ROOT, env=env
        )
        results[backend] = (code, time.perf_counter() - start)
    print("\n===== summary =====")
    for backend, (code, seconds) in results.items():
        status = "passed" if code == 0 else f"FAILED (pytest exit code {code})"
        print(f"{backend:<11} {status:<30} {seconds:7.0f} s")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
