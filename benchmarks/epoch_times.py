"""Per-epoch wall times of `fit` on the reference MLP, with and without
`ActivationGradientCallback`: shows the run-to-run spread of whole fits
that `bench_callback.py`'s fit ratio carries.

On the 2-core machine of the README's figures, epochs of 16 steps take
either about 0.92 s or about 1.26 s, with or without the callback, with
NumPy or `tf.data` input.

Usage:

    python benchmarks/epoch_times.py            # 6 fits of 3 epochs each way
    python benchmarks/epoch_times.py --fits 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _reference import BATCH, CLASSES, WIDTH, build_model  # noqa: E402

import keras_actgrad  # noqa: E402

STEPS = 16


class EpochTimer(keras.callbacks.Callback):
    """Records each epoch's wall time, from its start to the end of the
    callbacks listed before this one."""

    def on_train_begin(self, logs: Any = None) -> None:
        self.times: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=6, help="fits each way")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH * STEPS,)).astype("int32")
    model = build_model()
    probe = keras_actgrad.ActivationGradientCallback((x[:BATCH], y[:BATCH]))
    timer = EpochTimer()
    runs = {"without": [timer], "with": [probe, timer]}
    for callbacks in runs.values():  # warm up
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
    for _ in range(args.fits):
        for name, callbacks in runs.items():
            model.fit(
                x,
                y,
                batch_size=BATCH,
                epochs=3,
                verbose=0,
                shuffle=False,
                callbacks=callbacks,
            )
            epochs = ", ".join(f"{t:.2f}" for t in timer.times)
            print(f"{name:>8} callback: epochs {epochs} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
