"""Benchmark: the floor under the monitor's cost, without keras-actgrad.

What does it cost a training step to reduce the gradient at every layer
output inside the step, at best? A hand-written training step of the
reference MLP's shapes (10 x Dense(512) ReLU, a 10-class head, softmax
cross-entropy, Adam, batch 512) in the framework alone: no Keras, no
keras-actgrad. The gradient at each hidden layer's output is taken inside
the step's own backward pass (a `custom_vjp` identity on JAX, a
`tf.custom_gradient` identity in a `tf.function` on TensorFlow, a tensor
hook on PyTorch), and reduced there with the framework's fastest ops:

- `none`: the step alone (no identity);
- `grad_norm`: one sum of squares of each gradient, the least any
  gradient statistic reads (the monitor's default statistic);
- `weights`: that, and the monitor's weight norms (`weight_gradients=True`,
  its default): the squared norm of each weight's gradient, of its update
  and of the weight before the update, the update taken from a copy of
  the weights made before the optimizer's step;
- `one_read`: `grad_norm`, and one sum of each activation: each of the
  20 tensors read once;
- `statistics`: the reductions the monitor's 12 statistics need, and
  nothing more: per example sums of squares, sum, sum of |g|, max |g| and
  count of nonzeros of each gradient; sum, sum of squares and per unit
  nonzero counts of each activation.

The ratio of each to `none` is the median over rounds of the two times of
the same round (the order shuffled every round). Issue 13's target for the
monitor with all statistics and weight gradients is 1.03x `fit` without
it: `statistics` is what the statistics alone cost, at best, on this
machine, before any weight norm, and below it the monitor cannot go.

`--model resnet50` (PyTorch only): keras.applications ResNet50 with
`insert_probes` (107 probes), batch 32, 64 x 64, Keras's own eager torch
model stepped by hand in torch (`none`, `grad_norm`, `statistics`), the
floor under `bench_monitor.py --model resnet50` on PyTorch.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_floor.py [--rounds 60]
    KERAS_BACKEND=torch python benchmarks/bench_floor.py --model resnet50 --rounds 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEPTH, WIDTH, BATCH, CLASSES = 10, 512, 512, 10
VARIANTS = ("none", "grad_norm", "weights", "one_read", "statistics")
LEARNING_RATE, BETA_1, BETA_2, EPSILON = 1e-3, 0.9, 0.999, 1e-7


@contextlib.contextmanager
def probe_calls(probes: list[Any], call: Callable[..., Any] | None) -> Iterator[None]:
    """Each probe layer's `call` replaced by `call` (None: kept), then restored."""
    if call is not None:
        for probe in probes:
            probe.call = call
    try:
        yield
    finally:
        for probe in probes:
            probe.__dict__.pop("call", None)


def _torch_gradient(g: Any, variant: str) -> list[Any]:
    """The torch reductions of a gradient for `variant` (rows: examples)."""
    import torch

    if variant != "statistics":
        return [torch.linalg.vector_norm(g)]
    magnitude = g.abs()
    return [
        torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1),
        g.sum(),
        magnitude.sum(),
        magnitude.max(),
        magnitude.sign_().sum(),
    ]


def _torch_activation(a: Any, variant: str) -> list[Any]:
    """The torch reductions of an activation for `variant` (units: last axis)."""
    import torch

    if variant == "one_read":
        return [a.sum()]
    if variant != "statistics":
        return []
    units = a.reshape(-1, a.shape[-1])
    return [a.sum(), torch.linalg.vector_norm(a), units.abs().sign_().sum(0)]


def _data() -> tuple[Any, Any, list[Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")
    shapes = [(WIDTH, WIDTH)] * DEPTH + [(WIDTH, CLASSES)]
    weights = [
        (rng.normal(size=s) * np.sqrt(2.0 / s[0])).astype("float32") for s in shapes
    ]
    return x, y, weights


def jax_steps() -> dict[str, Callable[[], object]]:
    import jax
    import jax.numpy as jnp

    x, y, init = _data()
    weights = [jnp.asarray(w) for w in init]
    slots = [jnp.zeros_like(w) for w in weights]

    def reduce_gradient(g: Any, variant: str) -> list[Any]:
        rows = jnp.sum(g * g, axis=1)
        if variant != "statistics":
            return [jnp.sum(rows)]
        magnitude = jnp.abs(g)
        return [
            rows,
            jnp.sum(g),
            jnp.sum(magnitude),
            jnp.max(magnitude),
            jnp.sum((g != 0).astype("float32")),
        ]

    def reduce_activation(a: Any, variant: str) -> list[Any]:
        if variant in ("grad_norm", "weights"):
            return []
        if variant == "one_read":
            return [jnp.sum(a)]
        return [jnp.sum(a), jnp.sum(a * a), jnp.sum((a != 0).astype("float32"), 0)]

    def make(variant: str) -> Callable[..., Any]:
        reduced: list[Any] = []

        @jax.custom_vjp
        def tap(a: Any) -> Any:
            return a

        def tap_forward(a: Any) -> Any:
            return a, None

        def tap_backward(_: Any, g: Any) -> Any:
            reduced.extend(reduce_gradient(g, variant))
            return (g,)

        tap.defvjp(tap_forward, tap_backward)

        def loss(weights: list[Any]) -> Any:
            h, shares = jnp.asarray(x), []
            for w in weights[:-1]:
                h = jnp.maximum(h @ w, 0.0)
                if variant != "none":
                    shares.extend(reduce_activation(h, variant))
                    h = tap(h)
            logits = h @ weights[-1]
            picked = jnp.take_along_axis(logits, jnp.asarray(y)[:, None], axis=1)
            return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked[:, 0]), shares

        def step(weights: list[Any], m: list[Any], v: list[Any], t: Any) -> Any:
            reduced.clear()
            (value, shares), grads = jax.value_and_grad(loss, has_aux=True)(weights)
            t = t + 1.0
            m = [BETA_1 * a + (1 - BETA_1) * g for a, g in zip(m, grads, strict=True)]
            v = [
                BETA_2 * a + (1 - BETA_2) * g * g for a, g in zip(v, grads, strict=True)
            ]
            rate = LEARNING_RATE * jnp.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
            new = [
                w - rate * a / (jnp.sqrt(b) + EPSILON)
                for w, a, b in zip(weights, m, v, strict=True)
            ]
            if variant == "weights":
                reduced.extend(jnp.sum(g * g) for g in grads)
                reduced.extend(
                    jnp.sum((n - w) ** 2) for w, n in zip(weights, new, strict=True)
                )
                reduced.extend(jnp.sum(w * w) for w in weights)
            return new, m, v, t, value, shares + list(reduced)

        return jax.jit(step)

    def run(function: Callable[..., Any]) -> Callable[[], object]:
        state = [weights, slots, slots, jnp.zeros(())]

        def call() -> object:
            out = function(*state)
            jax.block_until_ready(out)
            state[:] = out[:4]
            return out

        return call

    return {variant: run(make(variant)) for variant in VARIANTS}


def tensorflow_steps() -> dict[str, Callable[[], object]]:
    import tensorflow as tf

    x, y, init = _data()

    def reduce_gradient(g: Any, variant: str) -> list[Any]:
        if variant != "statistics":
            return [tf.math.reduce_euclidean_norm(g)]
        magnitude = tf.abs(g)
        return [
            tf.math.reduce_euclidean_norm(g, axis=1),
            tf.reduce_sum(g),
            tf.reduce_sum(magnitude),
            tf.reduce_max(magnitude),
            tf.reduce_sum(tf.sign(magnitude)),
        ]

    def reduce_activation(a: Any, variant: str) -> list[Any]:
        if variant in ("grad_norm", "weights"):
            return []
        if variant == "one_read":
            return [tf.reduce_sum(a)]
        # Per unit nonzero counts as the squared norm of sign(a): two
        # passes, as the monitor counts them (a sum of sign(|a|) is three).
        return [
            tf.reduce_sum(a),
            tf.math.reduce_euclidean_norm(a),
            tf.round(tf.square(tf.math.reduce_euclidean_norm(tf.sign(a), 0))),
        ]

    def make(variant: str) -> Callable[[], object]:
        weights = [tf.Variable(w) for w in init]
        m = [tf.Variable(tf.zeros_like(w)) for w in init]
        v = [tf.Variable(tf.zeros_like(w)) for w in init]
        t = tf.Variable(0.0)
        features, labels = tf.constant(x), tf.constant(y)

        @tf.function
        def step() -> Any:
            reduced: list[Any] = []

            @tf.custom_gradient
            def tap(a: Any) -> Any:
                def backward(g: Any) -> Any:
                    reduced.extend(reduce_gradient(g, variant))
                    return g

                return tf.identity(a), backward

            shares: list[Any] = []
            with tf.GradientTape() as tape:
                h = features
                for w in weights[:-1]:
                    h = tf.nn.relu(h @ w)
                    if variant != "none":
                        shares.extend(reduce_activation(h, variant))
                        h = tap(h)
                logits = h @ weights[-1]
                value = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
                )
            grads = tape.gradient(value, weights)
            old = [tf.identity(w) for w in weights] if variant == "weights" else []
            t.assign_add(1.0)
            rate = LEARNING_RATE * tf.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
            for w, a, b, g in zip(weights, m, v, grads, strict=True):
                a.assign(BETA_1 * a + (1 - BETA_1) * g)
                b.assign(BETA_2 * b + (1 - BETA_2) * tf.square(g))
                w.assign_sub(rate * a / (tf.sqrt(b) + EPSILON))
            if variant == "weights":
                norm = tf.math.reduce_euclidean_norm
                reduced.extend(norm(g) for g in grads)
                reduced.extend(norm(w - o) for w, o in zip(weights, old, strict=True))
                reduced.extend(norm(o) for o in old)
            return value, shares + reduced

        def call() -> object:
            value, out = step()
            return float(value), [o.numpy() for o in out]

        return call

    return {variant: make(variant) for variant in VARIANTS}


def torch_steps() -> dict[str, Callable[[], object]]:
    import torch

    x, y, init = _data()
    features, labels = torch.from_numpy(x), torch.from_numpy(y).long()

    def make(variant: str) -> Callable[[], object]:
        weights = [torch.tensor(w, requires_grad=True) for w in init]
        optimizer = torch.optim.Adam(weights, lr=LEARNING_RATE, eps=EPSILON)

        def call() -> object:
            reduced: list[Any] = []

            def hook(g: Any) -> None:
                with torch.no_grad():
                    reduced.extend(_torch_gradient(g, variant))

            h = features
            for w in weights[:-1]:
                h = torch.relu(h @ w)
                if variant != "none":
                    with torch.no_grad():
                        reduced.extend(_torch_activation(h, variant))
                    h.register_hook(hook)
            value = torch.nn.functional.cross_entropy(h @ weights[-1], labels)
            optimizer.zero_grad()
            value.backward()
            if variant == "weights":
                old = [w.detach().clone().reshape(-1) for w in weights]
            optimizer.step()
            if variant == "weights":
                with torch.no_grad():
                    for w, o in zip(weights, old, strict=True):
                        g = w.grad.reshape(-1)
                        reduced.append(torch.dot(g, g))
                        reduced.append(torch.dot(o, o))
                        update = o.sub_(w.reshape(-1))
                        reduced.append(torch.dot(update, update))
            return float(value.detach()), [r.numpy() for r in reduced]

        return call

    return {variant: make(variant) for variant in VARIANTS}


def torch_resnet50_steps() -> dict[str, Callable[[], object]]:
    """ResNet50 (`bench_monitor.py --model resnet50`'s), stepped by hand in torch.

    The model is Keras's (keras.applications, random weights, 107
    `insert_probes` probes), run eagerly on the torch backend; the step
    around it is plain torch: the forward call, the loss, `backward()`,
    `torch.optim.Adam`. While the step runs, each probe's `call` is a
    `view_as` with a tensor hook that reduces the gradient there.
    """
    import keras
    import numpy as np
    import torch

    import keras_actgrad

    keras.utils.set_random_seed(0)
    model = keras_actgrad.insert_probes(
        keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    )
    probes = keras_actgrad.find_probes(model)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(32, 64, 64, 3)).astype("float32"))
    labels = torch.from_numpy(rng.integers(0, 10, size=(32,))).long()

    def make(variant: str) -> Callable[[], object]:
        parameters = [v.value for v in model.trainable_variables]
        optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, eps=EPSILON)

        def call() -> object:
            reduced: list[Any] = []

            def hook(g: Any) -> None:
                with torch.no_grad():
                    reduced.extend(_torch_gradient(g, variant))

            def tapped(inputs: Any, *args: Any, **kwargs: Any) -> Any:
                with torch.no_grad():
                    reduced.extend(_torch_activation(inputs, variant))
                output = inputs.view_as(inputs)
                output.register_hook(hook)
                return output

            with probe_calls(probes, tapped if variant != "none" else None):
                probabilities = model(features, training=True)
            value = torch.nn.functional.nll_loss(torch.log(probabilities), labels)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            return float(value.detach()), [r.numpy() for r in reduced]

        return call

    return {variant: make(variant) for variant in ("none", "grad_norm", "statistics")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--model", choices=["mlp", "resnet50"], default="mlp")
    args = parser.parse_args()
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    build = {
        "jax": jax_steps,
        "tensorflow": tensorflow_steps,
        "torch": torch_steps,
    }[backend]
    if args.model == "resnet50":
        if backend != "torch":
            parser.error("--model resnet50 runs on KERAS_BACKEND=torch only.")
        build = torch_resnet50_steps
    steps = build()
    for step in steps.values():  # compiled and warm
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    print(f"backend={backend} rounds={args.rounds} (median of paired rounds)")
    print(f"{'variant':12} {'median ms':>10} {'/ none':>8}")
    for name, values in times.items():
        ratio = statistics.median(
            a / b for a, b in zip(values, times["none"], strict=True)
        )
        print(f"{name:12} {1000 * statistics.median(values):10.1f} {ratio:7.3f}x")


if __name__ == "__main__":
    main()
