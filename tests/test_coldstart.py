"""The first probe pass: the probes' statistics traced once per probe shape.

On TensorFlow each probe share (an activation's or a gradient's statistics
and histogram) is one out-of-line function per shape; on JAX the probes of
one shape are reduced in one `lax.map`, built for finite tensors, and the
pass is taken again with the exact statistics when a tensor is not finite.
Either way, six probes of one shape trace each share once, and each probe
still gets its own values. PyTorch runs eagerly: nothing is traced.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_actgrad import (
    ActivationGradientCallback,
    GradientProbe,
    activation_gradients,
)
from keras_actgrad._backends.base import PassConfig
from keras_actgrad._engine import get_engine
from keras_actgrad._statistics.statistics import StatisticsReducer

pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="PyTorch runs the pass eagerly"
)


@pytest.fixture
def traces(monkeypatch):
    counts = {"a": 0, "g": 0}
    reduce_activation = StatisticsReducer.reduce_activation
    reduce_gradient = StatisticsReducer.reduce_gradient

    def count_activation(self, activation):
        counts["a"] += 1
        return reduce_activation(self, activation)

    def count_gradient(self, gradient):
        if gradient is not None:
            counts["g"] += 1
        return reduce_gradient(self, gradient)

    monkeypatch.setattr(StatisticsReducer, "reduce_activation", count_activation)
    monkeypatch.setattr(StatisticsReducer, "reduce_gradient", count_gradient)
    return counts


def _six_probes(activation: str = "tanh") -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8,))]
    for index in range(6):
        layers.append(keras.layers.Dense(8, activation=activation))
        layers.append(GradientProbe(name=f"p{index}"))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(loss="mse", optimizer="sgd")
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    return x, y


def test_probes_of_one_shape_share_one_traced_reduction(traces):
    model = _six_probes()
    x, y = _data()
    callback = ActivationGradientCallback(
        (x, y), log_statistics=["grad_norm", "act_mean", "grad_max_abs"]
    )
    callback.set_model(model)
    callback.on_train_begin()
    assert traces == {"a": 1, "g": 1}
    callback.on_epoch_end(0, {})
    assert traces == {"a": 1, "g": 1}
    # Each probe its own values: against the tensors `activation_gradients`
    # returns (no statistics involved), reduced by NumPy.
    results = activation_gradients(model, x, y)
    for index in range(6):
        result = results[f"p{index}"]
        gradient = np.asarray(result.gradient, np.float64)
        activation = np.asarray(result.activation, np.float64)
        logged = {
            name: callback.history[f"actgrad/p{index}/{name}"][-1]
            for name in ("grad_norm", "act_mean", "grad_max_abs")
        }
        assert logged["grad_norm"] == pytest.approx(
            np.sqrt(np.sum(gradient**2)), rel=1e-5
        )
        assert logged["act_mean"] == pytest.approx(
            np.mean(activation), rel=1e-5, abs=1e-7
        )
        assert logged["grad_max_abs"] == pytest.approx(
            np.max(np.abs(gradient)), rel=1e-6
        )


def test_a_nonfinite_probe_among_probes_of_one_shape():
    # One probe of six sees an Inf (a Lambda puts it there): its histogram
    # counts only its finite entries, in their range, and every probe's
    # mean is its own, as NumPy takes it (JAX takes the exact pass for the
    # whole batch; its pass for finite tensors would bin the Inf).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = inputs
    for index in range(6):
        h = keras.layers.Dense(8, activation="tanh")(h)
        if index == 3:
            h = keras.layers.Lambda(
                lambda t: keras.ops.where(t > 0.5, float("inf"), t), name="inf"
            )(h)
        h = GradientProbe(name=f"p{index}")(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(loss="mse", optimizer="sgd")
    x, y = _data()
    results = activation_gradients(model, x, y)
    engine = get_engine(model)
    reducer = StatisticsReducer(("act_mean", "act_zero_fraction"), 10)
    config = PassConfig("model", False, False, reducer)
    outputs = engine.run(engine.prepare(x, y, None, "model"), config)
    reduced = reducer.unpack(outputs.outputs, outputs.reached, [])
    for index in range(6):
        name = f"p{index}"
        activation = np.asarray(results[name].activation, np.float64)
        if index < 4:  # after p3, NaN on TensorFlow (Inf - Inf), finite on JAX
            assert np.isfinite(activation).all() == (index != 3)
        np.testing.assert_allclose(
            reduced.statistics[name]["act_mean"], np.mean(activation), rtol=1e-5
        )
        np.testing.assert_allclose(
            reduced.statistics[name]["act_zero_fraction"], np.mean(activation == 0)
        )
        low, high, counts = reduced.histograms[name]["activation"]
        finite = activation[np.isfinite(activation)]
        assert np.sum(counts) == finite.size
        if finite.size:
            assert (low, high) == pytest.approx((finite.min(), finite.max()), rel=1e-6)
