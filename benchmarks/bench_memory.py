"""Benchmark: peak memory of a probe event against a training step.

Peak resident memory (RSS) of one call, per backend, on an MLP of `probes`
x Dense(width) ReLU with a `GradientProbe` after each (batch `batch`, so
each probe tensor holds batch x width float32 values: 8 MB at the issue's
1024 x 2048). Measured calls:

- `train`: `model.train_on_batch` on the batch;
- `event`: one epoch event of `ActivationGradientCallback` (the probe pass
  and its statistics), without histograms; `histograms`: with them;
- `actgrad`: `activation_gradients` (its result counts: `returned` is the
  size of the arrays it returns);
- `gradient` (not run by default): an event with the gradient statistics
  only, without histograms (nothing reads the activations).

Method: one fresh process per measurement (a peak is a high-water mark, and
allocators keep memory they freed). The process builds the model and data
and warms up: the measured call on a few examples (traces, compiles,
creates the optimizer state). It then reads its RSS as the baseline,
resets the kernel's peak-RSS counter (`VmHWM`, by writing 5 to
`/proc/self/clear_refs`), runs the call on the whole batch `--reps` times
and reports `VmHWM - baseline`: the memory the call needs on top of the
model and its data, including its first trace at the batch's shape and,
on TensorFlow, the growth of oneDNN's CPU allocator pool (it never shrinks).
`--steady` warms up on the whole batch instead, with TensorFlow's plain
allocator (`TF_ENABLE_ONEDNN_OPTS=0`): the call's own peak, as a device
would see it. `tracemalloc` would miss all of it: TensorFlow, XLA and
PyTorch allocate tensors in C++, outside Python's allocator. glibc's mmap
threshold is pinned (`MALLOC_MMAP_THRESHOLD_`), so that large buffers go
back to the system when freed, as a device allocator's would, instead of
staying in the heap and hiding the next call's peak. Numbers measured while
other processes use the CPU are indicative.

Usage:

    python benchmarks/bench_memory.py                 # all backends, 8/24/48 probes
    python benchmarks/bench_memory.py --backends tensorflow --probes 24
    python benchmarks/bench_memory.py --quick         # Dense(512), batch 1024
    python benchmarks/bench_memory.py --steady        # without the first trace
    python benchmarks/bench_memory.py --model resnet50 --backends tensorflow
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
MODES = ("train", "event", "histograms", "actgrad", "gradient")
# --steady: warm up on the whole batch (the measured call's own trace and
# compilation excluded) with TensorFlow's plain allocator
# (TF_ENABLE_ONEDNN_OPTS=0: oneDNN's keeps a pool that never shrinks, so a
# warm-up on the whole batch would hide the next call's peak).
GRADIENT_ONLY = [
    "grad_norm",
    "grad_mean_abs",
    "grad_std",
    "grad_max_abs",
    "grad_zero_fraction",
    "sample_grad_norm_mean",
    "sample_grad_norm_max",
]
STEADY = os.environ.get("ACTGRAD_BENCH_STEADY") == "1"


def _status(field: str) -> int:
    """A `/proc/self/status` field, in bytes."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match, field
    return int(match.group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def build_application(name: str, batch: int) -> tuple:
    """A `keras.applications` model (random weights), probes inserted, data."""
    import keras
    import numpy as np

    import keras_actgrad

    keras.utils.set_random_seed(0)
    application = {
        "resnet50": keras.applications.ResNet50,
        "densenet121": keras.applications.DenseNet121,
    }[name]
    model = application(weights=None, input_shape=(64, 64, 3), classes=10)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    model = keras_actgrad.insert_probes(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    return model, x, y


def child(
    mode: str, probes: int, width: int, batch: int, reps: int, model_name: str = "mlp"
) -> dict:
    """Runs in the measuring process: builds, warms up, measures `mode`."""

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    import keras_actgrad

    if model_name != "mlp":
        model, x, y = build_application(model_name, batch)
        return _measure(model, x, y, mode, reps, warm=batch if STEADY else 8)
    keras.utils.set_random_seed(0)
    layers: list = [keras.Input((width,))]
    for index in range(probes):
        layers.append(
            keras.layers.Dense(width, activation="relu", name=f"dense_{index}")
        )
        layers.append(keras_actgrad.GradientProbe(name=f"dense_{index}_probe"))
    layers.append(keras.layers.Dense(10, name="logits"))
    model = keras.Sequential(layers)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    return _measure(model, x, y, mode, reps, warm=batch if STEADY else 32)


def _measure(model: Any, x: Any, y: Any, mode: str, reps: int, warm: int) -> dict:
    import gc

    import keras_actgrad

    returned = 0

    def make_call(x: Any, y: Any) -> Callable[[], object]:
        if mode == "train":
            return lambda: model.train_on_batch(x, y)
        if mode == "actgrad":
            return lambda: keras_actgrad.activation_gradients(model, x, y)
        statistics = None
        if mode == "gradient":
            statistics = GRADIENT_ONLY
        callback = keras_actgrad.ActivationGradientCallback(
            (x, y), histograms=mode == "histograms", statistics=statistics
        )
        callback.set_model(model)
        callback.on_train_begin()  # one probe pass, as `fit` runs it

        def event() -> object:
            callback.events.clear()
            logs: dict = {}
            callback.on_epoch_end(0, logs)
            return logs

        return event

    # The warm-up: the same call on a few examples (traces, compiles and
    # creates the optimizer state, all of which stay), then the measured
    # calls on the whole batch, from a fixed baseline. TensorFlow's CPU
    # allocator (oneDNN's, a BFC pool) keeps what it grew to, so its peak
    # shows in every later call; XLA and PyTorch return freed buffers, so
    # the last call is measured without the new shape's compilation.
    make_call(x[:warm], y[:warm])()
    gc.collect()
    baseline = _status("VmRSS")
    _reset_peak()
    call = make_call(x, y)  # an event: the callback's first probe pass
    for _ in range(reps):
        _reset_peak()
        result = call()
        if mode == "actgrad":
            returned = sum(
                r.activation.nbytes + (0 if r.gradient is None else r.gradient.nbytes)
                for r in result.values()
            )
        del result
        gc.collect()
    peak = _status("VmHWM") - baseline
    return {"peak": peak, "returned": returned, "baseline": baseline}


def measure(
    backend: str,
    mode: str,
    probes: int,
    width: int,
    batch: int,
    reps: int,
    model: str = "mlp",
    steady: bool = False,
) -> dict:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        MALLOC_MMAP_THRESHOLD_="131072",
        **(
            {"ACTGRAD_BENCH_STEADY": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}
            if steady
            else {}
        ),
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--probes",
        str(probes),
        "--width",
        str(width),
        "--batch",
        str(batch),
        "--reps",
        str(reps),
        "--model",
        model,
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{backend} {mode} {probes}: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 24, 48])
    parser.add_argument("--modes", nargs="+", default=list(MODES[:4]), choices=MODES)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=2, help="calls per measurement")
    parser.add_argument("--quick", action="store_true", help="Dense(512), batch 1024")
    parser.add_argument(
        "--model",
        default="mlp",
        choices=["mlp", "resnet50", "densenet121"],
        help="mlp: probes x Dense(width); resnet50 / densenet121: "
        "keras.applications (weights=None, 64x64 images, insert_probes), "
        "--batch 32 unless given",
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="warm up on the whole batch, TensorFlow without oneDNN's pool: "
        "the call's own peak, without its first trace",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch = 512, 1024
    if args.child:
        print(
            json.dumps(
                child(
                    args.child,
                    args.probes[0],
                    args.width,
                    args.batch,
                    args.reps,
                    args.model,
                )
            )
        )
        return 0
    if args.model != "mlp":
        if args.batch == 2048:
            args.batch = 32
        args.probes = [0]
    mb = 1 << 20
    probe_mb = args.width * args.batch * 4 / mb
    described = (
        f"MLP Dense({args.width}) ReLU, batch {args.batch}: {probe_mb:.0f} MB a "
        "probe tensor"
        if args.model == "mlp"
        else f"{args.model} (64x64, insert_probes), batch {args.batch}"
    )
    print(
        f"{described}; peak RSS of one call above the warm process, MB "
        f"({args.reps} calls a measurement)"
    )
    header = f"{'backend':11} {'probes':>6} " + " ".join(f"{m:>10}" for m in args.modes)
    header += "   ratios to train (event, histograms, gradient), actgrad-returned"
    print(header)
    for backend in args.backends:
        for probes in args.probes:
            peaks = {}
            returned = 0
            for mode in args.modes:
                result = measure(
                    backend,
                    mode,
                    probes,
                    args.width,
                    args.batch,
                    args.reps,
                    args.model,
                    args.steady,
                )
                peaks[mode] = result["peak"] / mb
                returned = max(returned, result["returned"] / mb)
            line = f"{backend:11} {probes:>6} " + " ".join(
                f"{peaks[m]:>10.0f}" for m in args.modes
            )
            train = peaks.get("train")
            if train:
                for mode in ("event", "histograms", "gradient"):
                    line += (
                        f"  {peaks[mode] / train:>10.2f}x"
                        if mode in peaks
                        else " " * 13
                    )
                if "actgrad" in peaks:
                    line += f"  {(peaks['actgrad'] - returned) / train:>8.2f}x"
                    line += f" (returns {returned:.0f} MB)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
