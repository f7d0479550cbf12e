"""Benchmark: a probe event in chunks (`probe_batch_size`) against the whole batch.

An MLP of `probes` x Dense(width) ReLU with a `GradientProbe` after each,
and a probe batch of `batch` examples. Per backend (one process each), one
`ActivationGradientCallback` per configuration, each warmed up by
`on_train_begin` (which traces its passes); then `rounds` rounds, each
timing one epoch event (`on_epoch_end`) of every configuration in turn, so
that the configurations share the machine's load; the median per
configuration is reported, with its ratio to the whole batch with the same
options. With histograms, chunks cost a second pass over the batch (the
first finds each probe's range); with weight gradients, one running sum of
the weights on the device.

`--memory`: the peak resident memory of one event above the warm process
instead, one fresh process per configuration (as `bench_memory.py
--steady`: warmed up by a whole event, TensorFlow's plain allocator, glibc's
mmap threshold pinned, the kernel's peak counter reset before the event).

Usage:

    python benchmarks/bench_chunks.py                  # all backends
    python benchmarks/bench_chunks.py --backends tensorflow --rounds 9
    python benchmarks/bench_chunks.py --memory --batch 4096 --chunk 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "whole": {},
    "whole+hist": {"histograms": True},
    "whole+hist+weights": {"histograms": True, "weight_gradients": True},
    "chunks": {"chunked": True},
    "chunks+hist": {"chunked": True, "histograms": True},
    "chunks+hist+weights": {
        "chunked": True,
        "histograms": True,
        "weight_gradients": True,
    },
}


def _status(field: str) -> int:
    """A `/proc/self/status` field, in bytes."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(match.group(1)) * 1024


def child(args: argparse.Namespace) -> dict[str, float]:
    import keras
    import numpy as np

    import keras_actgrad

    keras.utils.set_random_seed(0)
    inputs = keras.Input((args.width,))
    h = inputs
    for i in range(args.probes):
        h = keras.layers.Dense(args.width, activation="relu", name=f"dense_{i}")(h)
        h = keras_actgrad.GradientProbe(name=f"probe_{i}")(h)
    outputs = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.width)).astype("float32")
    y = rng.integers(0, 10, size=args.batch).astype("int32")
    callbacks = {}
    names = [args.only] if args.only else list(CONFIGS)
    for name in names:
        options = CONFIGS[name]
        callback = keras_actgrad.ActivationGradientCallback(
            (x, y),
            histograms=bool(options.get("histograms")),
            weight_gradients=bool(options.get("weight_gradients")),
            probe_batch_size=args.chunk if options.get("chunked") else None,
        )
        callback.set_model(model)
        callback.on_train_begin()
        callback.on_epoch_end(0, {})  # a warm event
        callbacks[name] = callback
    if args.only:
        baseline = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM
        callbacks[args.only].on_epoch_end(1, {})
        return {args.only: (_status("VmHWM") - baseline) / 2**20}
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, callback in callbacks.items():
            start = time.perf_counter()
            callback.on_epoch_end(round_ + 1, {})
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help="peak memory, MB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(
        f"{args.probes} probes x Dense({args.width}), batch {args.batch}, "
        f"chunks of {args.chunk}; median of {args.rounds} rounds"
    )
    for backend in args.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, __file__, "--child"] + [
            f"--{key}={value}"
            for key, value in vars(args).items()
            if key not in ("backends", "child", "memory", "only")
        ]
        if args.memory:
            env.update(MALLOC_MMAP_THRESHOLD_="131072", TF_ENABLE_ONEDNN_OPTS="0")
            medians = {}
            for name in CONFIGS:
                medians.update(_run([*command, f"--only={name}"], env))
        else:
            medians = _run(command, env)
        print(f"\n{backend}:")
        unit = "MB" if args.memory else "ms"
        for name, value in medians.items():
            base = medians[name.replace("chunks", "whole")]
            shown = value if args.memory else value * 1e3
            print(f"  {name:22s} {shown:8.1f} {unit}  {value / base:5.2f}x whole")


def _run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    output = subprocess.run(
        command, env=env, check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
