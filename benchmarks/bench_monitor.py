"""Benchmark: the cost of `GradientMonitor` inside `fit`.

On the reference MLP (10 x Dense(512) ReLU, a probe after every hidden
layer, batch 512, Adam), 16 steps an epoch, everything warm (every
compiled function traced before timing), side by side in one process, one
`fit` of one epoch per configuration and round:

- `plain`: `fit` without callbacks;
- `every_step`: the monitor at every step, all statistics, weight gradients;
- `every_16`: the monitor every 16 steps (once an epoch), default statistics;
- `every_step_no_weights`: every step, default statistics,
  `weight_gradients=False` (the non-finite checks then take one reduction
  over every gradient and weight of their own);
- `histograms_100`: every step, default statistics, histograms every 100
  steps (with 16 steps a fit, the rounds hit a histogram step now and then,
  as a long run does);
- `probe_callback_batch_1`: `ActivationGradientCallback(batch_freq=1)`, the
  probe pass rerun after every step, for comparison.

Then, steadier on a shared machine: `every_step, step pairs`, the time of
a monitored step over the unmonitored step next to it, inside `fit` with
`GradientMonitor(every_n_steps=2, statistics=None)` (all statistics,
weight gradients), each step timed by a callback; the median of the pairs'
ratios over `rounds` fits (the MLP's 8 pairs a fit, ResNet50's 2). A whole
fit's time moves by +-10% between rounds here (README), a pair's two steps
see the same machine.

Targets (issue 13): every_step <= 1.03x plain, every_16 <= 1.01x,
histograms_100 <= 1.02x; the probe callback was 1.30x. Each ratio is the
median over rounds of the two times measured in the same round.

`--model resnet50`: ResNet50 from `keras.applications` (random weights,
64 x 64 x 3 inputs, 10 classes, Adam) with `insert_probes` (107 probes),
batch 32, 4 steps a fit; `plain`, `every_step` and `every_16` only (target:
every_step <= 1.05x plain).

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_monitor.py           # full run
    KERAS_BACKEND=jax python benchmarks/bench_monitor.py --quick   # smoke check
    KERAS_BACKEND=tensorflow python benchmarks/bench_monitor.py --model resnet50
    KERAS_BACKEND=jax python benchmarks/bench_monitor.py --rounds 5 \
        --only every_step,every_step_no_weights,step_pairs,step_pairs_no_weights
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

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

STEPS = 16


class StepTimes(keras.callbacks.Callback):
    """The wall time of every training step of a `fit` (first callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def alternating_ratio(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    batch: int,
    fits: int,
    weight_gradients: bool = True,
) -> float:
    """Monitored / unmonitored step time, paired step by step inside `fit`.

    `GradientMonitor(every_n_steps=2)` monitors every other step (all
    statistics, weight gradients); each monitored step is paired with the
    unmonitored step next to it, so that both see the same machine. The
    ratio is the median of the pairs' ratios. A step's time includes the
    callbacks' work (the monitor's host side on its steps).
    """
    monitor = keras_actgrad.GradientMonitor(
        every_n_steps=2,
        statistics=None if weight_gradients else ("grad_norm",),
        weight_gradients=weight_gradients,
    )
    timer = StepTimes()

    def fit() -> None:
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=[timer, monitor],
        )

    for _ in range(2):  # warm: both train functions traced
        fit()
    ratios: list[float] = []
    for _ in range(fits):
        timer.times.clear()
        start = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        fit()
        times = timer.times
        for i in range(len(times) - 1):
            if (start + i) % 2 == 0:  # step i monitored, step i + 1 not
                ratios.append(times[i] / times[i + 1])
    return float(np.median(ratios))


RESNET_BATCH, RESNET_STEPS, RESNET_SIZE = 32, 4, 64


def build_resnet50() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """ResNet50 (random weights) with `insert_probes`, and its data."""
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(RESNET_SIZE, RESNET_SIZE, 3), classes=10
    )
    model = keras_actgrad.insert_probes(model)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy())
    rng = np.random.default_rng(0)
    size = RESNET_BATCH * RESNET_STEPS
    x = rng.normal(size=(size, RESNET_SIZE, RESNET_SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, size=(size,)).astype("int32")
    return model, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--model", choices=["mlp", "resnet50"], default="mlp")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated configurations to time (plain is always timed)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 15)

    if args.model == "resnet50":
        model, x, y = build_resnet50()
        batch, steps = RESNET_BATCH, RESNET_STEPS
    else:
        model = build_model()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(STEPS * BATCH, WIDTH)).astype("float32")
        y = rng.integers(0, CLASSES, size=(STEPS * BATCH,))
        batch, steps = BATCH, STEPS
    probe_batch = (x[:batch], y[:batch])

    callbacks: dict[str, Callable[[], list[keras.callbacks.Callback]]] = {}
    every_step = keras_actgrad.GradientMonitor(statistics=None)
    every_16 = keras_actgrad.GradientMonitor(every_n_steps=16)
    no_weights = keras_actgrad.GradientMonitor(weight_gradients=False)
    histograms = keras_actgrad.GradientMonitor(histograms_every_n_steps=100)
    probe_callback = keras_actgrad.ActivationGradientCallback(
        probe_batch, freq=[], batch_freq=1, histograms=False
    )
    callbacks = {
        "plain": lambda: [],
        "every_step": lambda: [every_step],
        "every_16": lambda: [every_16],
        "every_step_no_weights": lambda: [no_weights],
        "histograms_100": lambda: [histograms],
        "probe_callback_batch_1": lambda: [probe_callback],
    }
    if args.model == "resnet50":
        for name in ("histograms_100", "probe_callback_batch_1"):
            del callbacks[name]
    if args.only:
        chosen = {"plain", *args.only.split(",")}
        callbacks = {k: v for k, v in callbacks.items() if k in chosen}

    def fit(name: str) -> Callable[[], object]:
        def run() -> object:
            return model.fit(
                x,
                y,
                batch_size=batch,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=callbacks[name](),
            )

        return run

    functions = {name: fit(name) for name in callbacks}
    # Warm up: every compiled function (Keras's, the monitored ones with and
    # without histograms: 100 steps reach a histogram step) traced.
    for _ in range(2):
        for function in functions.values():
            function()
    while "histograms_100" in functions and not any(
        e["histograms"] for e in histograms.events
    ):  # pragma: no cover - only if 100 steps were not reached yet
        functions["histograms_100"]()
    for monitor in (every_step, every_16, histograms, no_weights):
        monitor.events.clear()
    times = timings(functions, rounds)
    print(
        f"model={args.model} backend={keras.backend.backend()} rounds={rounds} "
        f"({steps} steps a fit, batch {batch})"
    )
    for name in functions:
        median = float(np.median(times[name]))
        ratio = paired_ratio(times, name, "plain")
        print(f"  {name:24} {median:7.3f} s   {ratio:5.3f}x plain")
    pairs = args.only.split(",") if args.only else ["step_pairs"]
    if "step_pairs" in pairs:
        ratio = alternating_ratio(model, x, y, batch, rounds)
        print(
            f"  {'every_step, step pairs':24} {'':9}   {ratio:5.3f}x plain "
            "(monitored / next unmonitored step, every_n_steps=2, all statistics)"
        )
    if "step_pairs_no_weights" in pairs:
        ratio = alternating_ratio(model, x, y, batch, rounds, weight_gradients=False)
        print(
            f"  {'no weights, step pairs':24} {'':9}   {ratio:5.3f}x plain "
            "(as above, default statistics, weight_gradients=False)"
        )


if __name__ == "__main__":
    main()
