"""Tests for `activation_gradients` and the probe engine (TensorFlow)."""

import keras
import numpy as np
import tensorflow as tf

from keras_actgrad import GradientProbe, activation_gradients


def test_kernel_regularizer_downstream_does_not_break_model_loss():
    # Regression: Keras reads regularized weights from the stateless scope's
    # state mapping; without them `compute_loss` failed with a NoneType error.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = GradientProbe(name="p")(keras.layers.Dense(5, activation="relu")(inputs))
    head = keras.layers.Dense(2, use_bias=False, kernel_regularizer="l2")
    model = keras.Model(inputs, head(h))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    got = activation_gradients(model, x, y)["p"]
    # Closed form: loss = mean((h W - y)^2) + l2 * |W|^2, so
    # dL/dh = 2 / (n * k) * (h W - y) W^T (the regularizer does not depend on h).
    hidden = got.activation
    kernel = head.kernel.numpy()
    want = 2.0 / y.size * (hidden @ kernel - y) @ kernel.T
    np.testing.assert_allclose(got.gradient, want, rtol=1e-5, atol=1e-7)
    assert tf.reduce_all(tf.math.is_finite(got.gradient))


def test_sequential_never_called_before_the_probe_pass():
    # Regression: `check_inputs` read `model.input`, which a Sequential model
    # only has once called; `insert_probes` output (and the callback's first
    # probe pass in `on_train_begin`) failed with an AttributeError.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, use_bias=False),
         GradientProbe(name="p")]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((4, 3), dtype="float32")
    y = np.zeros((4, 2), dtype="float32")
    got = activation_gradients(model, x, y)["p"]
    # loss = mean((h - y)^2) over 8 entries, so dL/dh = 2 / 8 * (h - y).
    np.testing.assert_allclose(got.gradient, 0.25 * (got.activation - y), rtol=1e-6)
