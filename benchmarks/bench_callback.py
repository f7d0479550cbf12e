"""Benchmark: the cost of `ActivationGradientCallback` events and fits.

On the reference MLP (10 x Dense(512) ReLU, a probe after every hidden
layer, batch 512), everything warm, side by side in one process:

- one probe event (the probe pass, the on-device statistics, the host
  transfer and the bookkeeping of `on_epoch_end`) with the default
  statistics (all of them), with histograms, and with `weight_gradients`,
  each against one `train_on_batch` on the same batch;
- `fit` with the callback probing every epoch (16 steps an epoch,
  histograms and TensorBoard writing on) against `fit` without it, and the
  time spent inside the callback's hooks during those fits (a steadier
  figure than the ratio of two whole fits on a shared machine);
- an event with 10 probes against an event with 1 probe (after the first
  layer, so the backward pass is as long), with the default statistics
  (the target) and, for information, with histograms too.

Targets (issue 3): event / train_on_batch <= 0.8 (default statistics),
<= 1.0 (histograms), <= 1.2 (weight gradients); fit with / without <= 1.05;
10 probes / 1 probe <= 1.3. Times are medians of interleaved runs; a ratio
is the median over rounds of the two times measured in the same round.

Usage:

    python benchmarks/bench_callback.py            # full run
    python benchmarks/bench_callback.py --quick    # a few reps, smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _reference import (  # noqa: E402
    BATCH,
    CLASSES,
    DEPTH,
    WIDTH,
    build_model,
    paired_ratio,
    timings,
)

import keras_actgrad  # noqa: E402

STEPS = 16


def event(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], **kwargs: object
) -> Callable[[], object]:
    """One epoch event of a callback attached to `model` (as `fit` would)."""
    callback = keras_actgrad.ActivationGradientCallback(data, **kwargs)  # type: ignore[arg-type]
    callback.set_model(model)
    callback.on_train_begin()
    logs: dict[str, float] = {}

    def run() -> object:
        callback.events.clear()
        callback.on_epoch_end(0, logs)
        return logs

    return run


def timed_hook(
    hook: Callable[..., object], total: list[float]
) -> Callable[..., object]:
    """`hook`, adding the seconds each call takes to `total`."""

    def run(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            total.append(time.perf_counter() - start)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reps (smoke check)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--best",
        action="store_true",
        help="report the fastest run instead of the median (on a shared, "
        "noisy machine the fastest run is the least disturbed)",
    )
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 15)
    fit_reps = max(2, reps)
    epochs = 2 if args.quick else 3

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH * STEPS,)).astype("int32")
    batch = (x[:BATCH], y[:BATCH])

    model = build_model()
    one_probe = build_model(probes=1)
    functions: dict[str, Callable[[], object]] = {
        "train": lambda: model.train_on_batch(*batch),
        "event": event(model, batch, histograms=False),
        "histograms": event(model, batch, histograms=True),
        "weights": event(model, batch, histograms=False, weight_gradients=True),
        "event_1_probe": event(one_probe, batch, histograms=False),
        "histograms_1_probe": event(one_probe, batch, histograms=True),
    }
    for function in functions.values():  # warm up (trace, compile)
        function()
        function()
    summary: Callable[[list[float]], float] = min if args.best else statistics.median
    times = timings(functions, reps)

    with tempfile.TemporaryDirectory() as log_dir:
        callback = keras_actgrad.ActivationGradientCallback(
            batch, log_dir=log_dir, histograms=True
        )

        def fit_with() -> object:
            return model.fit(
                x,
                y,
                batch_size=BATCH,
                epochs=epochs,
                verbose=0,
                callbacks=[callback],
                shuffle=False,
            )

        def fit_without() -> object:
            return model.fit(
                x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False
            )

        fit_with()
        fit_without()
        # The callback's own time inside `fit`: its hooks, timed from the
        # inside. Unlike the ratio of two fits, this does not carry the
        # run-to-run noise of a whole `fit` on a shared machine.
        inside: list[float] = []
        for hook in ("on_train_begin", "on_epoch_end", "on_train_end"):
            setattr(callback, hook, timed_hook(getattr(callback, hook), inside))
        times.update(
            timings({"fit_without": fit_without, "fit_with": fit_with}, fit_reps)
        )
        times["callback_inside"] = [sum(inside) / fit_reps] * fit_reps

    timed = {name: summary(values) for name, values in times.items()}

    def ratio(a: str, b: str) -> float:
        # Medians: the median of the per-round ratios (both runs of a round
        # see the same load). Best: the ratio of the fastest runs.
        return timed[a] / timed[b] if args.best else paired_ratio(times, a, b)

    train = timed["train"]
    rows = [
        ("train_on_batch", train, 1.0, None, "train_on_batch"),
        (
            "event, all statistics",
            timed["event"],
            ratio("event", "train"),
            0.8,
            "train_on_batch",
        ),
        (
            "event, + histograms",
            timed["histograms"],
            ratio("histograms", "train"),
            1.0,
            "train_on_batch",
        ),
        (
            "event, + weight_gradients",
            timed["weights"],
            ratio("weights", "train"),
            1.2,
            "train_on_batch",
        ),
        (
            f"fit without callback ({epochs} ep)",
            timed["fit_without"],
            1.0,
            None,
            "fit without",
        ),
        (
            f"fit with callback ({epochs} ep)",
            timed["fit_with"],
            ratio("fit_with", "fit_without"),
            1.05,
            "fit without",
        ),
        (
            "  of which the callback's hooks",
            timed["callback_inside"],
            timed["callback_inside"] / timed["fit_without"],
            None,
            "fit without",
        ),
        ("event, 1 probe", timed["event_1_probe"], 1.0, None, "1 probe"),
        (
            "event, 10 probes",
            timed["event"],
            ratio("event", "event_1_probe"),
            1.3,
            "1 probe",
        ),
        (
            "event, 1 probe, + histograms",
            timed["histograms_1_probe"],
            1.0,
            None,
            "1 probe, hist.",
        ),
        (
            "event, 10 probes, + histograms",
            timed["histograms"],
            ratio("histograms", "histograms_1_probe"),
            None,
            "1 probe, hist.",
        ),
    ]
    print(
        f"keras-actgrad callback benchmark: {DEPTH} x Dense({WIDTH}) ReLU, "
        f"batch {BATCH}, {STEPS} steps an epoch, backend "
        f"{keras.backend.backend()}, {'best' if args.best else 'medians'} of "
        f"{reps} runs ({fit_reps} for fit)"
    )
    column = "best ms" if args.best else "median ms"
    print(f"{'measurement':<34} {column:>10} {'ratio':>7}  {'vs':<15} target")
    for name, seconds, value, target, versus in rows:
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.2f}: " + ("met" if value <= target else "MISSED")
        print(
            f"{name:<34} {seconds * 1e3:>10.1f} {value:>6.2f}x  {versus:<15} {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
