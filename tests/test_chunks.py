"""`probe_batch_size`: a probe batch run in chunks gives the whole batch's statistics.

References: the statistics of the unchunked batch (the same callback without
`probe_batch_size`) and the NumPy definitions applied to the whole batch's
activations and gradients (`activation_gradients`, itself checked against
hand-split tapes in test_engine.py).
"""

import keras
import numpy as np
import pytest
from test_statistics import reference_statistics

import keras_actgrad
from keras_actgrad._statistics.statistics import STATISTICS


def build(activity_regularizer=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(
        32,
        activation="relu",
        name="hidden",
        # Unit 0 is dead on every example.
        bias_initializer=keras.initializers.Constant(np.r_[-100.0, np.zeros(31)]),
        activity_regularizer=activity_regularizer,
    )(inputs)
    h = keras_actgrad.GradientProbe(name="hidden_probe")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    outputs = keras_actgrad.GradientProbe(name="logits_probe")(outputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Unit 1 reads input 0 only, which `data` makes negative in the first
    # 64 examples: dead in the first chunks, alive in the batch.
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[:, 1] = 0.0
    kernel[0, 1] = 1.0
    model.get_layer("hidden").set_weights([kernel, bias])
    return model


def data(rows=100):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 16)).astype("float32")
    x[:, 0] = np.where(np.arange(rows) < 64, -1.0, 1.0)
    y = (np.arange(rows) % 3).astype("int32")
    weights = rng.uniform(0.0, 2.0, size=rows).astype("float32")
    return x, y, weights


def probe_statistics(model, probe_data, **kwargs):
    callback = keras_actgrad.ActivationGradientCallback(
        probe_data, histograms=False, **kwargs
    )
    callback.set_model(model)
    callback.on_train_begin()
    return callback._probe().statistics  # the combined statistics, all of them


@pytest.mark.parametrize(
    ("loss", "size", "weighted"),
    [("model", 32, True), ("model", 7, False), ("sum", 32, False), ("mse", 50, True)],
)
def test_chunks_equal_the_whole_batch(loss, size, weighted):
    model = build()
    x, y, weights = data()
    if loss == "mse":
        y = keras.ops.convert_to_numpy(keras.ops.one_hot(y, 3))
    probe_data = (x, y, weights) if weighted else (x, y)
    whole = probe_statistics(model, probe_data, loss=loss)
    chunked = probe_statistics(model, probe_data, loss=loss, probe_batch_size=size)
    results = keras_actgrad.activation_gradients(
        model, x, y, loss=loss, sample_weight=weights if weighted else None
    )
    for name, result in results.items():
        expected = reference_statistics(result.activation, result.gradient)
        if name == "hidden_probe":
            # The case under test: one unit dead everywhere, one only in
            # some chunks (not dead in the batch).
            assert expected["dead_unit_fraction"] == 1 / 32
            assert np.all(result.activation[:size, 1] == 0)
            assert np.any(result.activation[:, 1] != 0)
        for stat in STATISTICS:
            np.testing.assert_allclose(
                chunked[name][stat],
                whole[name][stat],
                rtol=2e-5,
                atol=1e-9,
                err_msg=f"{name} {stat} chunked vs whole",
            )
            np.testing.assert_allclose(
                chunked[name][stat],
                expected[stat],
                rtol=2e-5,
                atol=1e-9,
                err_msg=f"{name} {stat} chunked vs NumPy",
            )


def test_chunks_with_an_activity_regularizer():
    # Keras 3 divides an activity regularizer's loss by the batch size, so a
    # chunk's gradient scales like the data loss's: still exact.
    model = build(activity_regularizer=keras.regularizers.L2(0.1))
    x, y, _ = data()
    whole = probe_statistics(model, (x, y))
    chunked = probe_statistics(model, (x, y), probe_batch_size=30)
    for name in whole:
        for stat in STATISTICS:
            np.testing.assert_allclose(
                chunked[name][stat],
                whole[name][stat],
                rtol=2e-5,
                atol=1e-9,
                err_msg=f"{name} {stat}",
            )


@pytest.mark.filterwarnings("ignore")
def test_chunks_with_nonfinite_values():
    # An infinite input in the second chunk only: every activation of that
    # example is non-finite; the counts add, the maximum is NaN as NumPy's.
    model = build()
    x, y, _ = data()
    x[40, 3] = np.inf
    whole = probe_statistics(model, (x, y), on_nonfinite="warn")
    chunked = probe_statistics(model, (x, y), on_nonfinite="warn", probe_batch_size=32)
    results = keras_actgrad.activation_gradients(model, x, y)
    for name, result in results.items():
        expected = reference_statistics(result.activation, result.gradient)
        for stat in ("nonfinite", "grad_max_abs", "act_zero_fraction"):
            np.testing.assert_allclose(
                chunked[name][stat], expected[stat], rtol=1e-6, err_msg=f"{name} {stat}"
            )
            np.testing.assert_allclose(
                chunked[name][stat],
                whole[name][stat],
                rtol=1e-6,
                err_msg=f"{name} {stat}",
            )


def test_chunks_in_fit():
    model = build()
    x, y, _ = data()
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), histograms=False, probe_batch_size=40, log_statistics=["grad_norm"]
    )
    history = model.fit(x, y, epochs=2, batch_size=50, callbacks=[callback], verbose=0)
    key = "actgrad/hidden_probe/grad_norm"
    assert len(history.history[key]) == 2
    assert np.all(np.isfinite(history.history[key]))


def test_probe_batch_size_errors():
    x, y, _ = data()
    with pytest.raises(ValueError, match="positive int.*Received: probe_batch_size=0"):
        keras_actgrad.ActivationGradientCallback((x, y), probe_batch_size=0)
    model = build()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), histograms=False, probe_batch_size=8
    )
    callback.set_model(model)
    with pytest.raises(ValueError, match="mean_with_sample_weight"):
        callback.on_train_begin()


@pytest.mark.parametrize(("loss", "size"), [("model", 32), ("sum", 7), ("model", 100)])
def test_activation_gradients_in_chunks(loss, size):
    model = build(activity_regularizer=keras.regularizers.L2(0.1))
    x, y, weights = data()
    whole = keras_actgrad.activation_gradients(
        model, x, y, loss=loss, sample_weight=weights
    )
    chunked = keras_actgrad.activation_gradients(
        model, x, y, loss=loss, sample_weight=weights, probe_batch_size=size
    )
    assert list(chunked) == list(whole)
    for name, result in whole.items():
        for field in ("activation", "gradient"):
            expected = getattr(result, field)
            got = getattr(chunked[name], field)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            scale = np.abs(expected).max()
            np.testing.assert_allclose(
                got, expected, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{name} {field}"
            )


def test_activation_gradients_probe_batch_size_errors():
    model = build()
    x, y, _ = data()
    with pytest.raises(ValueError, match="Received: probe_batch_size=-1"):
        keras_actgrad.activation_gradients(model, x, y, probe_batch_size=-1)
