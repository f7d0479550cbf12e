"""Benchmark: a probe event against a training step, on every Keras backend.

On the reference MLP (10 x Dense(512) ReLU, a probe after every hidden
layer: 10 probes, batch 512), each backend runs in its own process (Keras
fixes its backend at import) and times, side by side and warm:

- `train_on_batch`: that backend's own training step;
- `activation_gradients`: every probe's activation and gradient as NumPy;
- the callback's probe event: the same pass reduced on device to the
  callback's statistics (`StatisticsReducer`, no histograms), as NumPy.

Target (issue 6): a probe event <= 1.0x that backend's `train_on_batch`.
Times are medians of several interleaved runs.

Usage:

    python benchmarks/bench_backends.py            # every installed backend
    python benchmarks/bench_backends.py --quick    # a few reps (smoke check)
    python benchmarks/bench_backends.py --backends jax,torch
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BACKENDS = ("tensorflow", "jax", "torch")
from _reference import (  # noqa: E402
    BATCH,
    CLASSES,
    DEPTH,
    WIDTH,
    build_model,
    paired_ratio,
    timings,
)


def run_backend(reps: int) -> int:
    """Times one backend (the one in KERAS_BACKEND) and prints its table."""
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    import keras_actgrad
    from keras_actgrad._backends.base import PassConfig
    from keras_actgrad._engine import get_engine
    from keras_actgrad._statistics.statistics import STATISTICS, StatisticsReducer

    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")

    engine = get_engine(model)
    config = PassConfig("model", False, False, StatisticsReducer(STATISTICS, 0))
    batch = engine.prepare(x, y)

    def train() -> object:
        return model.train_on_batch(x, y)

    def probe() -> object:
        return keras_actgrad.activation_gradients(model, x, y)

    def event() -> object:
        return engine.run(batch, config).outputs

    functions = {"train": train, "probe": probe, "event": event}
    for _ in range(2):  # trace and compile everything
        for function in functions.values():
            function()
    times = timings(functions, reps)
    timed = {name: statistics.median(values) for name, values in times.items()}
    backend = keras.backend.backend()
    print(
        f"backend {backend}: {DEPTH} x Dense({WIDTH}) ReLU, {DEPTH} probes, "
        f"batch {BATCH}, medians of {reps} runs"
    )
    print(f"  {'approach':<34} {'median ms':>10} {'vs train':>9}  note")
    rows = [
        ("train_on_batch", "train", ""),
        ("activation_gradients (NumPy)", "probe", ""),
        ("probe event (statistics reducer)", "event", "target <= 1.00x: "),
    ]
    for label, key, note in rows:
        # The median of per-round ratios (both runs see the same load).
        ratio = paired_ratio(times, key, "train")
        if note:
            note += "met" if ratio <= 1.0 else "MISSED"
        print(f"  {label:<34} {timed[key] * 1e3:>10.1f} {ratio:>8.2f}x  {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reps (smoke check)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated backends"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 20)
    if args.child:
        return run_backend(reps)
    failed = False
    for backend in args.backends.split(","):
        module = "tensorflow" if backend == "tensorflow" else backend
        if importlib.util.find_spec(module) is None:
            print(f"backend {backend}: skipped ({module} is not installed)\n")
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, os.path.abspath(__file__), "--child", "--reps", str(reps)],
            env=env,
            capture_output=True,
            text=True,
        )
        print(result.stdout)
        if result.returncode != 0:
            failed = True
            print(f"backend {backend}: FAILED\n{result.stderr[-3000:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
