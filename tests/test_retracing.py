"""Probing many models in one process: no retracing warning blames the user.

TensorFlow counts a `tf.function`'s tracings per Python code object and
warns after five in a row ("creating @tf.function repeatedly in a loop").
Each compiled probe pass and monitored step is traced once per signature,
so a notebook or a sweep that probes several models or losses must not see
that warning about our functions. Inside one pass, the probes' statistics
are traced once per probe shape, not once per probe.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from keras_actgrad import (
    ActivationGradientCallback,
    GradientMonitor,
    GradientProbe,
    activation_gradients,
)

pytestmark = pytest.mark.requires_tensorflow(
    reason="the warning is TensorFlow's `tf.function` retracing detector"
)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_many_models_and_losses_do_not_warn_of_retracing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    handler = _Messages()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for width in range(4, 11):
            model = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(width),
                    GradientProbe(name="p"),
                    keras.layers.Dense(1),
                ]
            )
            model.compile(loss="mse", optimizer="sgd")
            activation_gradients(model, x, y)
            activation_gradients(model, x, loss="sum")
            callback = ActivationGradientCallback((x[:8], y[:8]), histograms=False)
            # One step per fit, monitored: only our functions trace.
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=1,
                verbose=0,
                callbacks=[callback, GradientMonitor()],
            )
    finally:
        logger.removeHandler(handler)
    retracing = [m for m in handler.messages if "retracing" in m]
    assert retracing == []


def test_probes_of_one_shape_share_one_traced_reduction(monkeypatch):
    # The first probe pass traces each probe share (an activation's or a
    # gradient's statistics and histogram) once per signature, not once per
    # probe: six probes of one shape, one trace of each share. Each probe
    # still gets its own values (against the tensors `activation_gradients`
    # returns, reduced by NumPy).
    from keras_actgrad._statistics.statistics import StatisticsReducer

    traces = {"a": 0, "g": 0}
    reduce_activation = StatisticsReducer.reduce_activation
    reduce_gradient = StatisticsReducer.reduce_gradient

    def count_activation(self, activation):
        traces["a"] += 1
        return reduce_activation(self, activation)

    def count_gradient(self, gradient):
        if gradient is not None:
            traces["g"] += 1
        return reduce_gradient(self, gradient)

    monkeypatch.setattr(StatisticsReducer, "reduce_activation", count_activation)
    monkeypatch.setattr(StatisticsReducer, "reduce_gradient", count_gradient)
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8,))]
    for index in range(6):
        layers.append(keras.layers.Dense(8, activation="tanh"))
        layers.append(GradientProbe(name=f"p{index}"))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(loss="mse", optimizer="sgd")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    callback = ActivationGradientCallback(
        (x, y), log_statistics=["grad_norm", "act_mean"]
    )
    callback.set_model(model)
    callback.on_train_begin()
    assert traces == {"a": 1, "g": 1}
    callback.on_epoch_end(0, {})
    results = activation_gradients(model, x, y)
    for index in range(6):
        result = results[f"p{index}"]
        gradient = np.asarray(result.gradient, np.float64)
        activation = np.asarray(result.activation, np.float64)
        assert callback.history[f"actgrad/p{index}/grad_norm"][-1] == pytest.approx(
            np.sqrt(np.sum(gradient**2)), rel=1e-5
        )
        assert callback.history[f"actgrad/p{index}/act_mean"][-1] == pytest.approx(
            np.mean(activation), rel=1e-5, abs=1e-7
        )
    assert traces == {"a": 1, "g": 1}
