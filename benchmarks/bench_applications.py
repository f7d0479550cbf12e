"""Benchmark: the cost of a probe event on ResNet50 / DenseNet121.

`keras.applications` models with random weights (64x64 images, 10
classes), probes inserted with `insert_probes` defaults (ResNet50: 107,
DenseNet121: 242), batch 32; everything warm, side by side in one process:
one epoch event of `ActivationGradientCallback` (all statistics), the same
with histograms, against one `train_on_batch` on the same batch. Each ratio
is the median over rounds of the two times measured in the same round.

Targets (issue 14): event <= 0.75x a training step on both; with
histograms <= 0.9x (ResNet50), <= 1.0x (DenseNet121). `--model mlp`: the
reference MLP of `bench_callback.py` (10 x Dense(512), batch 512; targets
of issue 3: 0.8x, 1.0x).

`--floor` (TensorFlow) also times the event's floor without keras-actgrad:
a `tf.function` of the model with the probes' outputs as extra outputs,
whose tape takes the gradient at every probe output and at nothing else
(no weight gradient, no reduction: `pass_alone`), then the same with
`tf.histogram_fixed_width` of every probe's activation and gradient in
their ranges (30 bins, the callback's default: `pass_histograms`). The
`pass_statistics` floors add the reductions the 12 statistics need, and
nothing more, written with TensorFlow's fastest ops as in
`bench_floor.py`'s `statistics` (per example sums of squares, sum, sum of
|g|, max |g| and count of nonzeros of each gradient; sum, sum of squares
and per unit nonzero counts of each activation, the counts as the
callback takes them, by the norm of sign(a)), without histograms and
with them (`pass_statistics_histograms`, the max |g| then from the
histogram's range). They are the least an event with all statistics can
cost on this machine with stock TensorFlow kernels.

`--compare` also times the event reduced after the whole backward pass
(the reducer called once on every probe's tensors, as before the probes
were reduced inside the backward pass), for a before / after in one
process.

Usage:

    python benchmarks/bench_applications.py --model resnet50
    python benchmarks/bench_applications.py --model densenet121 --reps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Hashable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

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
from bench_floor import probe_calls  # noqa: E402
from bench_memory import build_application  # noqa: E402

import keras_actgrad  # noqa: E402

TARGETS = {
    "mlp": {"event": 0.8, "histograms": 1.0},
    "resnet50": {"event": 0.75, "histograms": 0.9},
    "densenet121": {"event": 0.75, "histograms": 1.0},
}


class WholePass:
    """A reducer called once on the whole pass (no per-probe reduction)."""

    def __init__(self, reducer: Any) -> None:
        self._reducer = reducer

    @property
    def key(self) -> Hashable:
        return ("whole-pass", self._reducer.key)

    def __call__(self, *args: Any) -> Any:
        return self._reducer(*args)

    def __getattr__(self, name: str) -> Any:
        if name in ("reduce_activation", "reduce_gradient", "combine"):
            raise AttributeError(name)
        return getattr(self._reducer, name)


def event(model: keras.Model, data: Any, whole: bool, **kwargs: Any) -> Any:
    callback = keras_actgrad.ActivationGradientCallback(data, **kwargs)
    callback.set_model(model)
    if whole:
        # Benchmark only: the callback's reducer (keras-actgrad's own
        # private attribute) behind one without `combine`.
        callback._reducer = WholePass(callback._reducer)  # type: ignore[assignment]
    callback.on_train_begin()
    logs: dict[str, float] = {}

    def run() -> object:
        callback.events.clear()
        callback.on_epoch_end(0, logs)
        return logs

    return run


def floor(
    model: keras.Model, x: Any, y: Any, histograms: bool, reductions: bool = False
) -> Any:
    """The pass without keras-actgrad: gradients at the probe outputs (TF).

    While the function is traced, each probe's `call` is replaced by a
    `tf.identity` that the tape watches (the textbook way to differentiate
    a model at an inner tensor); the tape differentiates those tensors only.
    """
    import tensorflow as tf

    probes = keras_actgrad.find_probes(model)
    loss = keras.losses.SparseCategoricalCrossentropy()

    def histogram(tensor: Any) -> Any:
        value_range = tf.stack([tf.reduce_min(tensor), tf.reduce_max(tensor)])
        counts = tf.histogram_fixed_width(tensor, value_range, nbins=30)
        return tf.concat([value_range, tf.cast(counts, tf.float32)], 0)

    def reduce_gradient(g: Any) -> list[Any]:
        magnitude = tf.abs(g)
        rest = list(range(1, g.shape.rank))
        reduced = [
            tf.math.reduce_euclidean_norm(g, axis=rest),
            tf.reduce_sum(g),
            tf.reduce_sum(magnitude),
            tf.reduce_sum(tf.sign(magnitude)),
        ]
        if histograms:  # max |g| from the histogram's range
            return [*reduced, histogram(g)]
        return [*reduced, tf.reduce_max(magnitude)]

    def reduce_activation(a: Any) -> list[Any]:
        # Per unit nonzero counts as the squared norm of sign(a): two
        # passes, as the callback counts them (a sum of sign(|a|) is three).
        units = tf.math.reduce_euclidean_norm(tf.sign(a), list(range(a.shape.rank - 1)))
        reduced = [
            tf.reduce_sum(a),
            tf.math.reduce_euclidean_norm(a),
            tf.round(tf.square(units)),
        ]
        return [*reduced, histogram(a)] if histograms else reduced

    @tf.function
    def run(x: Any, y: Any) -> Any:
        activations: list[Any] = []
        with tf.GradientTape(watch_accessed_variables=False) as tape:

            def watched(inputs: Any, *args: Any, **kwargs: Any) -> Any:
                output = tf.identity(inputs)
                tape.watch(output)
                activations.append(output)
                return output

            with probe_calls(probes, watched):
                prediction = model(x, training=False)
            value = loss(y, prediction)
        gradients = tape.gradient(value, activations)
        if reductions:
            out = [r for a in activations for r in reduce_activation(a)]
            return out + [r for g in gradients for r in reduce_gradient(g)]
        if not histograms:
            return [tf.reduce_sum(g[:1]) for g in gradients]
        return [histogram(t) for t in activations + gradients]

    x, y = tf.constant(x), tf.constant(y)
    return lambda: [t.numpy() for t in run(x, y)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(TARGETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=8, help="timed rounds")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args(argv)
    if args.model == "mlp":
        model = build_model()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
        y = rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")
    else:
        model, x, y = build_application(args.model, args.batch)
    data = (x, y)
    probes = len(keras_actgrad.find_probes(model))
    functions: dict[str, Callable[[], object]] = {
        "train": lambda: model.train_on_batch(x, y),
        "event": event(model, data, False, histograms=False),
        "histograms": event(model, data, False, histograms=True),
    }
    if args.floor:
        functions["pass_alone"] = floor(model, x, y, histograms=False)
        functions["pass_histograms"] = floor(model, x, y, histograms=True)
        functions["pass_statistics"] = floor(model, x, y, False, reductions=True)
        functions["pass_statistics_histograms"] = floor(
            model, x, y, True, reductions=True
        )
    if args.compare:
        functions["event_whole"] = event(model, data, True, histograms=False)
        functions["histograms_whole"] = event(model, data, True, histograms=True)
    for function in functions.values():  # warm up (trace, compile)
        function()
        function()
    times = timings(functions, args.reps)
    shape = "512 features" if args.model == "mlp" else "64x64"
    print(
        f"{args.model}, {probes} probes, batch {len(x)}, {shape}, backend "
        f"{keras.backend.backend()}, medians of {args.reps} interleaved rounds"
    )
    print(f"{'measurement':<34} {'median ms':>10} {'ratio':>7}  target")
    for name in functions:
        ratio = paired_ratio(times, name, "train")
        target = TARGETS[args.model].get(name)
        verdict = (
            ""
            if target is None
            else f"<= {target:.2f}: " + ("met" if ratio <= target else "MISSED")
        )
        print(
            f"{name:<34} {statistics.median(times[name]) * 1e3:>10.1f} "
            f"{ratio:>6.2f}x  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
