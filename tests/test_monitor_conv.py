"""`GradientMonitor` leaves a convolutional network's training bit for bit.

The Dense models of `test_monitor.py` do not show it, but on JAX a tapped
gradient reduced (or returned) inside the compiled step changed XLA's
rounding of this network's weight gradients (a stride-2 depthwise
convolution, BatchNormalization and ReLU6 at 1x1 spatial size, as at the
end of keras.applications MobileNet on 32x32 inputs): weights drifted by
about 1e-7 from `fit` without the monitor.

On JAX this is a known failure (an expected failure, not strict: XLA's
fusion choices may depend on the CPU, and the suite reports XPASS the day
it passes). The cause: any reduction of a tapped gradient inside the step
makes XLA:CPU store the ReLU6-backward `select` as a separate result; the
fusions that read it then compile differently, and XLA:CPU's reduction
adds are reassociable, so the same sums round differently. Returning a
concatenated copy of each tapped tensor and reducing it in a second
`jit` keeps the training kernels bit-identical, but cost about 2.5x `fit`
on the reference MLP (branch `jbit`, not merged).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientMonitor
from keras_actgrad._statistics.statistics import STATISTICS

STEPS, BATCH = 4, 16


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    layers = keras.layers

    def block(filters: int) -> list[keras.layers.Layer]:
        return [
            layers.ZeroPadding2D(((0, 1), (0, 1))),
            layers.DepthwiseConv2D(3, strides=2, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
            layers.Conv2D(filters, 1, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
        ]

    model = keras.Sequential(
        [keras.Input((4, 4, 64)), *block(128), *block(256)]
        + [layers.GlobalAveragePooling2D(), layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return keras_actgrad.insert_probes(model)


def _state(model: keras.Model) -> list[np.ndarray]:
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]


@pytest.mark.xfail(
    keras.backend.backend() == "jax",
    reason="XLA:CPU rounds the monitored step's conv gradients differently",
    strict=False,
)
def test_conv_batchnorm_training_is_bit_identical() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 4, 4, 64)).astype("float32")
    y = (np.arange(STEPS * BATCH) % 10).astype("int32")
    runs = []
    for monitored in (False, True):
        model = _model()
        monitor = GradientMonitor(1, statistics=None, histograms_every_n_steps=2)
        history = model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[monitor] if monitored else [],
        )
        runs.append((_state(model), history.history, monitor.events))
    (plain, plain_history, _), (watched, watched_history, events) = runs
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain_history == watched_history
    for event in events:
        for values in event["statistics"].values():
            assert np.isfinite(values["grad_norm"])


# Every statistic read from the gradient alone (none of the activation).
GRADIENT_STATISTICS = tuple(
    s for s in STATISTICS if not s.startswith(("act_", "dead_"))
)


def _residual_model() -> keras.Model:
    """BatchNormalization feeding a residual Add, as in MobileNetV3 and ResNet."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same")(inputs)
    r = layers.Conv2D(4, 1)(x)
    r = layers.BatchNormalization()(r)
    x = layers.Add()([x, r])
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(3)(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return keras_actgrad.insert_probes(model)


def _train_residual(monitor: GradientMonitor | None) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 32)
    model = _residual_model()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[] if monitor is None else [monitor],
    )
    if monitor is not None:
        assert [e["step"] for e in monitor.events] == [1, 2, 3, 4]
    return _state(model)


@pytest.mark.xfail(
    keras.backend.backend() == "jax",
    reason="XLA:CPU rounds the monitored step's conv gradients differently",
    strict=False,
)
def test_residual_batchnorm_gradient_statistics_train_bit_identical() -> None:
    # Every gradient statistic and the weight gradients read only tensors
    # of the backward pass: TensorFlow's graph rewrites are unchanged.
    plain = _train_residual(None)
    watched = _train_residual(
        GradientMonitor(1, statistics=GRADIENT_STATISTICS, weight_gradients=True)
    )
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.xfail(
    keras.backend.backend() in ("tensorflow", "jax"),
    reason=(
        "TensorFlow: reading the BatchNormalization output for activation "
        "statistics stops Grappler's arithmetic optimizer from merging it "
        "into the residual Add (AddN), which rounds differently; "
        "JAX: XLA:CPU fusion"
    ),
    strict=False,
)
def test_residual_batchnorm_activation_statistics_train_bit_identical() -> None:
    plain = _train_residual(None)
    watched = _train_residual(GradientMonitor(1, statistics=("act_mean", "act_std")))
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="Grappler is TensorFlow's"
)
def test_residual_activation_statistics_only_change_grappler_rounding() -> None:
    # The cause of the expected failure above, shown: with Grappler's
    # arithmetic optimizer off (for both runs) the monitored run with
    # activation statistics is bit for bit the unmonitored one.
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    try:
        plain = _train_residual(None)
        watched = _train_residual(GradientMonitor(1, statistics=("act_mean",)))
    finally:
        tf.config.optimizer.set_experimental_options(
            {"arithmetic_optimization": before.get("arithmetic_optimization", True)}
        )
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
