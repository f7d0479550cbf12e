"""The TensorFlow adapter: the only module of the engine that imports it.

A probe output is made differentiable by passing it through `tf.identity`
and watching the result on a `tf.GradientTape`: the tape's gradient with
respect to that tensor is the sum over its consumers, which are exactly the
layers downstream of the probe. Consumers of the probe's *input* (skip
branches, the previous layer's activity regularizer) are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_actgrad._engine import LossFn, PassConfig, Tapped, forward, probe_scope


def _is_float(tensor: Any) -> bool:
    return bool(getattr(tensor, "dtype", None) is not None and tensor.dtype.is_floating)


class TensorFlowAdapter:
    """Builds the probe pass as one `tf.function`."""

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[[Any, Any, Any], Any]:
        def step(x: Any, y: Any, sample_weight: Any) -> Any:
            tapped: list[Tapped] = []
            calls: dict[str, int] = {}

            def tap(probe: Any, tensor: Any) -> Any:
                count = calls.get(probe.name, 0)
                calls[probe.name] = count + 1
                name = probe.name if count == 0 else f"{probe.name}@{count}"
                if not _is_float(tensor):
                    tapped.append(Tapped(name, tensor, False))
                    return tensor
                output = tf.identity(tensor)
                tape.watch(output)
                tapped.append(Tapped(name, output, True, output))
                return output

            with tf.GradientTape(
                watch_accessed_variables=config.weight_gradients
            ) as tape:
                with probe_scope(model):
                    y_pred = forward(model, x, config.training, tap)
                    loss = tf.cast(loss_fn(x, y, y_pred, sample_weight), tf.float32)
            on_trace(tapped)
            handles = [t.handle for t in tapped if t.differentiable]
            variables = (
                list(model.trainable_variables) if config.weight_gradients else []
            )
            grads = tape.gradient(
                loss,
                handles + variables,
                unconnected_gradients=tf.UnconnectedGradients.NONE,
            )
            probe_grads = iter(grads[: len(handles)])
            gradients = {
                t.name: next(probe_grads) if t.differentiable else None for t in tapped
            }
            activations = {t.name: t.activation for t in tapped}
            weight_gradients = {
                v.path: g for v, g in zip(variables, grads[len(handles) :], strict=True)
            }
            return config.reducer(activations, gradients, weight_gradients, loss)

        compiled: Callable[[Any, Any, Any], Any] = tf.function(step)
        return compiled

    def to_numpy(self, value: Any) -> np.ndarray:
        if hasattr(value, "numpy"):
            return np.asarray(value.numpy())
        return np.asarray(value)
