"""What every benchmark shares: the reference MLP and interleaved timing.

The reference model (the issues' benchmark): 10 x Dense(512) ReLU with a
`GradientProbe` after each hidden layer, a 10-class head, batch 512.
Keras is imported inside `build_model`, so that a benchmark may choose the
backend (`KERAS_BACKEND`) after importing this module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

DEPTH, WIDTH, BATCH, CLASSES = 10, 512, 512, 10


def build_model(probes: int = DEPTH) -> Any:
    """The reference MLP with a probe after the first `probes` hidden layers."""
    import keras

    import keras_actgrad

    keras.utils.set_random_seed(0)
    layers: list[keras.layers.Layer] = [keras.Input((WIDTH,))]
    for index in range(DEPTH):
        layers.append(
            keras.layers.Dense(WIDTH, activation="relu", name=f"dense_{index}")
        )
        if index < probes:
            layers.append(keras_actgrad.GradientProbe(name=f"dense_{index}_probe"))
    layers.append(keras.layers.Dense(CLASSES, name="logits"))
    model = keras.Sequential(layers, name="mlp")
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def timings(
    functions: dict[str, Callable[[], object]], reps: int
) -> dict[str, list[float]]:
    """Wall times of each function over `reps` rounds, in seconds.

    The functions run interleaved, one after the other in every round, so
    that a change in the machine's load affects all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def median_times(
    functions: dict[str, Callable[[], object]],
    reps: int,
    summary: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Median (or `summary`) wall time of each function over `reps` rounds."""
    return {name: summary(values) for name, values in timings(functions, reps).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of `a`'s time / `b`'s time in the same round.

    Steadier than a ratio of medians on a shared machine: both runs of a
    round see the same load.
    """
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
