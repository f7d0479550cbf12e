"""Probing many models in one process: no retracing warning blames the user.

TensorFlow counts a `tf.function`'s tracings per Python code object and
warns after five in a row ("creating @tf.function repeatedly in a loop").
Each compiled probe pass and monitored step is traced once per signature,
so a notebook or a sweep that probes several models or losses must not see
that warning about our functions.
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
