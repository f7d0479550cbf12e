"""Benchmark: in-place measurement costs what probes cost.

The reference MLP (10 x Dense(512) ReLU, batch 512) measured two ways in
one process, interleaved, everything warm:

- `probes`: the model with a `GradientProbe` after every hidden layer,
  `activation_gradients(probed, x, y)`;
- `in place`: the same layers (same weights) without probes,
  `activation_gradients(plain, x, y, layers="dense_*")`: the hidden
  layers' outputs measured in place.

Both passes compute the same thing (checked: same gradients); in place, the
taps are set up while the pass is traced, so the compiled pass is the same
graph. Target (issue 12): in place within 5% of probes (paired ratio of the
median round).

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_inplace.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _reference import BATCH, CLASSES, WIDTH, build_model, paired_ratio, timings  # noqa: E402

import keras_actgrad  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few reps only")
    args = parser.parse_args()
    reps = 5 if args.quick else 30

    probed = build_model()
    plain = keras_actgrad.strip_probes(probed)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,))

    def with_probes() -> object:
        return keras_actgrad.activation_gradients(probed, x, y)

    def in_place() -> object:
        return keras_actgrad.activation_gradients(plain, x, y, layers="dense_*")

    a, b = with_probes(), in_place()
    for index in range(10):
        np.testing.assert_allclose(
            a[f"dense_{index}_probe"].gradient,
            b[f"mlp/dense_{index}"].gradient,
            rtol=1e-5,
            atol=1e-9,
        )
    for _ in range(2):  # warm
        with_probes(), in_place()
    times = timings({"probes": with_probes, "in place": in_place}, reps)
    for name, values in times.items():
        print(f"{name:>9}: median {1e3 * float(np.median(values)):8.2f} ms")
    ratio = paired_ratio(times, "in place", "probes")
    print(
        f"backend {keras.backend.backend()}: in place / probes = {ratio:.3f} "
        f"(target <= 1.05; {reps} interleaved rounds)"
    )


if __name__ == "__main__":
    main()
