"""Benchmark: the cost of `GradientMonitor`'s non-finite checks.

A/B in one process, on the reference MLP (10 x Dense(512) ReLU, a probe
after every hidden layer, batch 512, Adam, 16 steps a fit): the monitor at
every step with its non-finite checks (`checks`), and the same monitor
whose step was traced with the checks replaced by zeros (`no_checks`: the
monitored step as it was before the checks), for `weight_gradients=False`
(the checks' own reduction over every gradient and weight) and
`weight_gradients=True` (the checks reuse the weight norms). `plain` is
`fit` without callbacks. The fits run interleaved, every configuration
once per round; each ratio is the median over rounds of the two times of
the same round (`_reference.paired_ratio`). On a loaded machine, `--cpu`
times each fit by the process's CPU time (all threads) instead of the wall
clock: less sensitive to other processes taking the cores.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_nonfinite.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _reference import (  # noqa: E402
    BATCH,
    CLASSES,
    WIDTH,
    build_model,
    paired_ratio,
    timings,
)

import keras_actgrad  # noqa: E402
from keras_actgrad._engine import step as step_module  # noqa: E402

STEPS = 16


@contextmanager
def without_checks() -> Iterator[None]:
    """Traces monitored steps whose checks are constant zeros."""
    original = step_module.step_checks

    def zeros(grads: Any, new: Any, squares: Any = None) -> Any:
        return keras.ops.zeros((2, len(new)), "float32")

    step_module.step_checks = zeros
    try:
        yield
    finally:
        step_module.step_checks = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cpu", action="store_true", help="process CPU time")
    args = parser.parse_args()
    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(STEPS * BATCH,))

    monitors = {
        f"{kind}_{checks}": keras_actgrad.GradientMonitor(
            weight_gradients=(kind == "weights")
        )
        for kind in ("no_weights", "weights")
        for checks in ("checks", "no_checks")
    }

    def fit(name: str) -> Callable[[], object]:
        callbacks = [] if name == "plain" else [monitors[name]]

        def run() -> object:
            return model.fit(
                x,
                y,
                batch_size=BATCH,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            )

        return run

    functions = {name: fit(name) for name in ["plain", *monitors]}
    # Warm up: every function traced (the `no_checks` ones without checks).
    for name, function in functions.items():
        if name.endswith("no_checks"):
            with without_checks():
                function()
        else:
            function()
        function()
    for monitor in monitors.values():
        monitor.events.clear()
    if args.cpu:
        times: dict[str, list[float]] = {name: [] for name in functions}
        for _ in range(args.rounds):
            for name, function in functions.items():
                start = time.process_time()
                function()
                times[name].append(time.process_time() - start)
    else:
        times = timings(functions, args.rounds)
    clock = "process CPU time" if args.cpu else "wall time"
    print(
        f"backend={keras.backend.backend()} rounds={args.rounds} "
        f"({STEPS} steps a fit, batch {BATCH}, {clock})"
    )
    for name in functions:
        median = float(np.median(times[name]))
        print(
            f"  {name:22} {median:7.3f} s   "
            f"{paired_ratio(times, name, 'plain'):5.3f}x plain"
        )
    for kind in ("no_weights", "weights"):
        ratio = paired_ratio(times, f"{kind}_checks", f"{kind}_no_checks")
        print(f"  checks / no checks, {kind:10}   {ratio:5.3f}x")


if __name__ == "__main__":
    main()
