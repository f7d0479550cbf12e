"""Benchmark: the first call (trace + compile + run) and the process's memory.

A user meets the cold calls: the first probe pass traces and compiles a
function as large as the model, and the process pays for every trace it
keeps. Two measurements, each in fresh processes (`--backend`, default the
current `KERAS_BACKEND`):

- `first`: one process builds the model (probes inserted), then times the
  first `train_on_batch` (Keras's train function: trace, compile, run) and
  then the first probe pass of `ActivationGradientCallback` at its defaults
  (all statistics, histograms: trace, compile, run), then both again warm.
  `--order probe` runs the probe pass first (no cache shared with the
  training step's trace helps it). Ratio: probe pass / train step.
- `fit`: a whole `fit` (2 epochs of 2 steps) in a fresh process without
  keras-actgrad, with `ActivationGradientCallback` at its defaults, and with
  `GradientMonitor()`: wall time of `fit` and the process's peak RSS
  (`ru_maxrss`, everything the process ever held, imports and traces
  included). Ratios against the run without.

Models: `resnet50`, `densenet121` (`keras.applications`, random weights,
64x64, 10 classes, `insert_probes` defaults, batch 32); `mlp24` (24 x
Dense(1024) ReLU with a probe after each, batch 2048); `gpt2` (a KerasHub
GPT-2 backbone from a 2-layer config with random weights, a probe after
each block and the embedding, 16 sequences of 64 tokens).

Usage:

    python benchmarks/bench_coldstart.py first --model resnet50
    python benchmarks/bench_coldstart.py fit --model mlp24 --rounds 3
    KERAS_BACKEND=jax python benchmarks/bench_coldstart.py first --model gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def build(name: str) -> tuple[Any, Any, Any]:
    """The model (compiled, probes inserted), a batch and its targets."""
    import keras
    import numpy as np

    import keras_actgrad

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name in ("resnet50", "densenet121"):
        application = {
            "resnet50": keras.applications.ResNet50,
            "densenet121": keras.applications.DenseNet121,
        }[name]
        model = application(weights=None, input_shape=(64, 64, 3), classes=10)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model = keras_actgrad.insert_probes(model)
        x = rng.normal(size=(32, 64, 64, 3)).astype("float32")
        y = rng.integers(0, 10, size=(32,)).astype("int32")
        return model, x, y
    if name == "mlp24":
        layers: list[Any] = [keras.Input((1024,))]
        for index in range(24):
            layers.append(keras.layers.Dense(1024, activation="relu"))
            layers.append(keras_actgrad.GradientProbe(name=f"probe_{index}"))
        layers.append(keras.layers.Dense(10))
        model = keras.Sequential(layers, name="mlp24")
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x = rng.normal(size=(2048, 1024)).astype("float32")
        y = rng.integers(0, 10, size=(2048,)).astype("int32")
        return model, x, y
    if name == "gpt2":
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=1000,
            num_layers=2,
            num_heads=4,
            hidden_dim=128,
            intermediate_dim=512,
            max_sequence_length=64,
        )
        tokens = keras.Input((None,), dtype="int32", name="token_ids")
        mask = keras.Input((None,), dtype="int32", name="padding_mask")
        hidden = backbone({"token_ids": tokens, "padding_mask": mask})
        logits = keras.layers.Dense(1000, name="lm_head")(hidden)
        model = keras.Model([tokens, mask], logits, name="gpt2_lm")
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model = keras_actgrad.insert_probes(model)
        ids = rng.integers(0, 1000, size=(16, 64)).astype("int32")
        x = [ids, np.ones_like(ids)]
        y = rng.integers(0, 1000, size=(16, 64)).astype("int32")
        return model, x, y
    raise SystemExit(f"Unknown model {name!r}.")


def child_first(name: str, order: str) -> dict[str, float]:
    import keras_actgrad

    model, x, y = build(name)
    callback = keras_actgrad.ActivationGradientCallback((x, y))
    callback.set_model(model)

    def train() -> None:
        model.train_on_batch(x, y)

    began = [False]

    def probe() -> None:
        # The first: `on_train_begin`'s check, one probe pass (trace +
        # compile + run), as in `fit`; then one event's pass.
        if not began[0]:
            began[0] = True
            callback.on_train_begin()
        else:
            callback._probe()

    first = {"train": train, "probe": probe}
    result: dict[str, float] = {}
    names = ["train", "probe"] if order == "train" else ["probe", "train"]
    for key in names:
        start = time.perf_counter()
        first[key]()
        result[f"{key}_cold"] = time.perf_counter() - start
    for key in names:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            first[key]()
            times.append(time.perf_counter() - start)
        result[f"{key}_warm"] = statistics.median(times)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child_fit(name: str, variant: str) -> dict[str, float]:
    import keras_actgrad

    model, x, y = build(name)
    callbacks: list[Any] = []
    if variant == "callback":
        callbacks = [keras_actgrad.ActivationGradientCallback((x, y))]
    elif variant == "monitor":
        callbacks = [keras_actgrad.GradientMonitor()]
    batch = len(y) // 2
    start = time.perf_counter()
    model.fit(
        x, y, batch_size=batch, epochs=2, verbose=0, shuffle=False, callbacks=callbacks
    )
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fit_s": seconds, "peak_rss_mb": rss}


def spawn(args: list[str], backend: str) -> dict[str, float]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, __file__, "--child", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["first", "fit"])
    parser.add_argument("--model", default="mlp24")
    parser.add_argument("--order", choices=["train", "probe"], default="train")
    parser.add_argument("--variant", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow")
    )
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        if args.what == "first":
            result = child_first(args.model, args.order)
        else:
            result = child_fit(args.model, args.variant)
        print(json.dumps(result))
        return
    print(f"backend={args.backend} model={args.model}")
    if args.what == "first":
        rows = [
            spawn(["first", "--model", args.model, "--order", args.order], args.backend)
            for _ in range(args.rounds)
        ]
        for key in rows[0]:
            print(f"  {key:<14} {statistics.median(r[key] for r in rows):9.2f}")
        ratio = statistics.median(r["probe_cold"] / r["train_cold"] for r in rows)
        warm = statistics.median(r["probe_warm"] / r["train_warm"] for r in rows)
        print(f"  cold probe/train {ratio:.2f}x   warm {warm:.2f}x")
        return
    results: dict[str, list[dict[str, float]]] = {
        "none": [],
        "callback": [],
        "monitor": [],
    }
    for _ in range(args.rounds):  # paired rounds: the three variants in turn
        for variant in results:
            results[variant].append(
                spawn(
                    ["fit", "--model", args.model, "--variant", variant], args.backend
                )
            )
    base = results["none"]
    for variant, rows in results.items():
        fit = statistics.median(
            r["fit_s"] / b["fit_s"] for r, b in zip(rows, base, strict=True)
        )
        rss = statistics.median(
            r["peak_rss_mb"] / b["peak_rss_mb"] for r, b in zip(rows, base, strict=True)
        )
        print(
            f"  {variant:<9} fit {statistics.median(r['fit_s'] for r in rows):7.1f} s"
            f" ({fit:.2f}x)  peak RSS "
            f"{statistics.median(r['peak_rss_mb'] for r in rows):7.0f} MB ({rss:.2f}x)"
        )


if __name__ == "__main__":
    main()
