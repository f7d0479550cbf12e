"""Benchmark: one probe pass against a training step and the naive approach.

On a 10 x Dense(512) ReLU MLP with a probe after every hidden layer (10
probes), batch 512, everything warm, this times side by side in one process:

- `train_on_batch`: one training step (forward, backward, optimizer update);
- `activation_gradients`: every probe's activation and d loss / d activation
  (the compiled training loss), as NumPy arrays;
- `train_on_batch` of the same model without probes (`strip_probes`): the
  probes' cost in training when not probing (target: none measurable);
- the naive eager approach of the question that started this project, done
  right: one `tf.GradientTape` per probe over the model split by hand at that
  probe, with the real loss.

Targets (issue 2): `activation_gradients` / `train_on_batch` <= 1.0 and at
least 10x faster than the naive approach. Times are medians of several
interleaved runs.

Usage:

    python benchmarks/bench_engine.py            # full run
    python benchmarks/bench_engine.py --quick    # a few reps, for a smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

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
    median_times,
    paired_ratio,
    timings,
)

import keras_actgrad  # noqa: E402


def naive_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """One eager tape per probe over the model split by hand at the probe."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = [model.get_layer(f"dense_{i}") for i in range(DEPTH)]
    head = model.get_layer("logits")
    results = {}
    for probe in range(DEPTH):
        h = tf.constant(x)
        for layer in dense[: probe + 1]:
            h = layer(h)
        with tf.GradientTape() as tape:
            tape.watch(h)
            out = h
            for layer in dense[probe + 1 :]:
                out = layer(out)
            loss = loss_fn(y, head(out))
        results[f"dense_{probe}_probe"] = (h.numpy(), tape.gradient(loss, h).numpy())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reps (smoke check)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 20)
    naive_reps = max(1, reps // 4) if args.quick else max(3, reps // 4)

    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")

    plain = keras_actgrad.strip_probes(model)  # same layers, same optimizer

    def train() -> object:
        return model.train_on_batch(x, y)

    def train_plain() -> object:
        return plain.train_on_batch(x, y)

    def probe() -> object:
        return keras_actgrad.activation_gradients(model, x, y)

    def naive() -> object:
        return naive_gradients(model, x, y)

    # Warm up: trace and compile everything once (twice for good measure).
    for _ in range(2):
        train()
        train_plain()
        probe()
        naive()
    # Sanity: the two ways of measuring agree.
    fast, slow = probe(), naive()
    for name, (activation, gradient) in slow.items():
        np.testing.assert_allclose(
            fast[name].activation, activation, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(fast[name].gradient, gradient, rtol=1e-3, atol=1e-9)

    times = timings({"train": train, "plain": train_plain, "probe": probe}, reps)
    timed = {name: statistics.median(values) for name, values in times.items()}
    timed.update(median_times({"naive": naive}, naive_reps))
    # Ratios between interleaved functions: the median of per-round ratios.
    ratio = paired_ratio(times, "probe", "train")
    plain = paired_ratio(times, "plain", "train")
    speedup = timed["naive"] / timed["probe"]

    print(
        f"keras-actgrad engine benchmark: {DEPTH} x Dense({WIDTH}) ReLU, "
        f"{DEPTH} probes, batch {BATCH}, backend {keras.backend.backend()}, "
        f"medians of {reps} runs ({naive_reps} for naive)"
    )
    rows = [
        ("train_on_batch", timed["train"], "1.00x", ""),
        (
            "train_on_batch, probes stripped",
            timed["plain"],
            f"{plain:.2f}x",
            f"the probes' cost when not probing: {(1 / plain - 1) * 100:+.1f}%",
        ),
        (
            "activation_gradients",
            timed["probe"],
            f"{ratio:.2f}x",
            "target <= 1.00x train_on_batch: " + ("met" if ratio <= 1.0 else "MISSED"),
        ),
        (
            "naive eager (tape per probe)",
            timed["naive"],
            f"{timed['naive'] / timed['train']:.2f}x",
            f"activation_gradients is {speedup:.1f}x faster (target >= 10x): "
            + ("met" if speedup >= 10 else "MISSED"),
        ),
    ]
    print(f"{'approach':<32} {'median ms':>10} {'vs train':>9}  note")
    for name, seconds, relative, note in rows:
        print(f"{name:<32} {seconds * 1e3:>10.1f} {relative:>9}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
