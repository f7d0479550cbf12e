"""An independent reference for in-place measurement (not a test module).

One eager pass with the backend's own autodiff: each selected layer's
output gets a zero tensor added (the layer's `call` is patched for that one
pass, here, with none of the package's code), and the gradient of the loss
with respect to those zeros is d loss / d (layer output). Keys follow the
documented scheme (`key`, `key@1`, `key:<i>`), with the keys given by the
test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np


def _run(model, x, y, loss, layers, perturb):
    counts: dict[str, int] = {}
    seen: dict[str, Any] = {}
    patched = []

    def patch(key, layer):
        original = layer.call

        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            several = isinstance(outputs, (list, tuple, dict))
            leaves = keras.tree.flatten(outputs)
            new = []
            for index, leaf in enumerate(leaves):
                if leaf is None:
                    new.append(leaf)
                    continue
                name = f"{key}:{index}" if several else key
                count = counts.get(name, 0)
                counts[name] = count + 1
                name = name if count == 0 else f"{name}@{count}"
                seen[name] = leaf
                new.append(leaf if perturb is None else leaf + perturb[name])
            return keras.tree.pack_sequence_as(outputs, new)

        layer.__dict__["call"] = call
        patched.append(layer)

    for key, layer in layers.items():
        patch(key, layer)
    try:
        value = loss(y, model(x, training=False))
    finally:
        for layer in patched:
            del layer.__dict__["call"]
    return value, seen


def reference(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Callable[[Any, Any], Any],
    layers: dict[str, keras.layers.Layer],
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """`{key: (activation, gradient)}` in forward order (gradient None if
    the loss does not depend on it)."""
    _, seen = _run(model, x, y, loss, layers, None)
    order = list(seen)
    activations = {k: keras.ops.convert_to_numpy(v) for k, v in seen.items()}
    shapes = {k: tuple(v.shape) for k, v in activations.items()}
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        zeros = {k: tf.zeros(s) for k, s in shapes.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(zeros.values()))
            value, _ = _run(model, x, y, loss, layers, zeros)
        grads = tape.gradient(value, zeros)
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        zeros = {k: jnp.zeros(s) for k, s in shapes.items()}
        # Jitted: Keras ops run eagerly one by one are slow on JAX.
        grads = jax.jit(jax.grad(lambda z: _run(model, x, y, loss, layers, z)[0]))(
            zeros
        )
    else:
        import torch

        zeros = {k: torch.zeros(s, requires_grad=True) for k, s in shapes.items()}
        value, _ = _run(model, x, y, loss, layers, zeros)
        found = torch.autograd.grad(value, list(zeros.values()), allow_unused=True)
        grads = dict(zip(zeros, found, strict=True))
    return {
        k: (
            activations[k],
            None if grads[k] is None else keras.ops.convert_to_numpy(grads[k]),
        )
        for k in order
    }


def check(results, expected, rtol=1e-4, atol=1e-6):
    """Same keys in the same order, activations and gradients close."""
    assert list(results) == list(expected)
    for key, (activation, gradient) in expected.items():
        # Compiled (XLA, tf.function) and eager float32 differ by roundoff.
        size = max(float(np.abs(activation).max()), 1e-12)
        np.testing.assert_allclose(
            results[key].activation,
            activation,
            rtol=1e-5,
            atol=1e-5 * size,
            err_msg=key,
        )
        if gradient is None or results[key].gradient is None:
            # Not connected to the loss: None (JAX's own autodiff gives
            # zeros there).
            assert gradient is None or not np.any(gradient), key
            assert results[key].gradient is None, key
            continue
        scale = max(float(np.abs(gradient).max()), 1e-12)
        np.testing.assert_allclose(
            results[key].gradient, gradient, rtol=rtol, atol=atol * scale, err_msg=key
        )
