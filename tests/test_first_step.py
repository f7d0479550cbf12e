"""The first training step is traced once with keras-actgrad on TensorFlow.

Without a `tf.distribute` strategy, Keras's TensorFlow trainer builds the
optimizer inside the first trace of its train function; the optimizer's
variables are then created while tracing, and `tf.function` traces the
whole step again. `GradientMonitor` and `ActivationGradientCallback` build
the optimizer when training begins, as Keras does under a strategy, so
that the step (the monitored one, or Keras's own) is traced once. Training
is unchanged: the weights after `fit` are those of a `fit` without them.
A custom `train_step` (which may use other optimizers) and a model with
unbuilt layers are left to Keras.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_actgrad import ActivationGradientCallback, GradientMonitor, GradientProbe

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="Keras's JAX trainer builds the optimizer before tracing; "
    "PyTorch's step is not traced",
)


class TraceCounter(keras.layers.Layer):
    """Identity; records `training` each time it is traced (not run)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.traced = []

    def call(self, x, training=None):
        import tensorflow as tf

        if not tf.executing_eagerly():
            self.traced.append(bool(training))
        return x


def _model() -> tuple[keras.Model, TraceCounter]:
    keras.utils.set_random_seed(0)
    counter = TraceCounter()
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            GradientProbe(name="p"),
            counter,
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    counter.traced.clear()  # the symbolic call that built the model
    return model, counter


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype(
        "float32"
    )


def _record_builds(optimizer) -> list[bool]:
    """Whether each `optimizer.build` call ran inside a trace."""
    import tensorflow as tf

    inside = []
    build = optimizer.build

    def recorded(variables):
        inside.append(tf.inside_function())
        return build(variables)

    optimizer.build = recorded
    return inside


def _plain_weights(epochs: int) -> list[np.ndarray]:
    model, counter = _model()
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)
    # What the tests below avoid: Keras alone traces its step twice.
    assert counter.traced == [True, True]
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize(
    "callback, traced",
    [
        # The monitored step once.
        (lambda x, y: GradientMonitor(statistics=None), [True]),
        # The probe pass (training=False) once, Keras's step once.
        (lambda x, y: ActivationGradientCallback((x[:8], y[:8])), [False, True]),
    ],
    ids=["monitor", "callback"],
)
def test_the_step_is_traced_once_and_trains_the_same(callback, traced):
    model, counter = _model()
    builds = _record_builds(model.optimizer)
    x, y = _data()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[callback(x, y)],
    )
    assert builds == [False]
    assert counter.traced == traced
    for got, expected in zip(model.get_weights(), _plain_weights(2), strict=True):
        np.testing.assert_array_equal(got, expected)


class CustomStep(keras.Model):
    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def test_a_custom_train_step_builds_its_optimizer_itself():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = GradientProbe(name="p")(keras.layers.Dense(8)(inputs))
    model = CustomStep(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    builds = _record_builds(model.optimizer)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientMonitor()])
    assert builds == [True]  # in the step's trace, as without keras-actgrad


class TwoLayers(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8)
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def test_a_model_with_unbuilt_layers_leaves_the_optimizer_to_keras():
    from keras_actgrad._backends import build_optimizer_before_tracing

    model = TwoLayers()
    model.compile(optimizer="adam", loss="mse")
    build_optimizer_before_tracing(model)
    assert not model.optimizer.built
    model.build((None, 4))  # builds the model, not its layers
    assert not model.hidden.built
    build_optimizer_before_tracing(model)
    assert not model.optimizer.built
    model(np.zeros((1, 4), "float32"))
    build_optimizer_before_tracing(model)
    assert model.optimizer.built
    assert len(model.optimizer.variables) > 2  # slots of the 4 weights
