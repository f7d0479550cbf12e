"""ActivationGradientCallback: logs, schedules, probe data, alerts, errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import csv  # noqa: E402
import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad import ActivationGradientCallback  # noqa: E402
from keras_actgrad._engine import get_engine  # noqa: E402


def mlp(seed=0, units=8, depth=2, activation="relu", loss="mse"):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,))]
    for i in range(depth):
        layers.append(keras.layers.Dense(units, activation=activation, name=f"d{i}"))
        layers.append(keras_actgrad.GradientProbe(name=f"p{i}"))
    layers.append(keras.layers.Dense(2, name="head"))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.05), loss)
    return model


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def grad_norm(result):
    return float(np.sqrt(np.sum(result.gradient.astype(np.float64) ** 2)))


def our_warnings(record):
    return [w for w in record if "keras_actgrad" in w.filename]


def test_history_matches_activation_gradients_at_same_weights():
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback((x[:16], y[:16]), histograms=False)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    results = keras_actgrad.activation_gradients(model, x[:16], y[:16])
    for probe in ("p0", "p1"):
        values = history.history[f"actgrad/{probe}/grad_norm"]
        assert len(values) == 3
        assert values[-1] == pytest.approx(grad_norm(results[probe]), rel=1e-5)
        # Training moved the weights: epochs differ.
        assert values[0] != values[-1]
    assert callback.probe_order == ["p0", "p1"]
    assert callback.history["epoch"] == [0, 1, 2]
    assert (
        callback.history["actgrad/p1/grad_norm"]
        == history.history["actgrad/p1/grad_norm"]
    )


def test_first_epoch_value_matches_weights_after_epoch_zero():
    model = mlp(seed=3)
    x, y = data(seed=3)
    callback = ActivationGradientCallback((x[:8], y[:8]), histograms=False)
    model.fit(
        x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback], shuffle=False
    )
    expected = keras_actgrad.activation_gradients(model, x[:8], y[:8])
    stats = callback.events[-1]["statistics"]
    for probe, result in expected.items():
        assert stats[probe]["grad_norm"] == pytest.approx(grad_norm(result), rel=1e-5)
        assert stats[probe]["act_mean"] == pytest.approx(
            float(result.activation.mean()), rel=1e-5, abs=1e-7
        )


def test_same_keys_every_epoch_nan_when_not_probed(tmp_path):
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback(
        (x, y), freq=2, log_statistics=("grad_norm", "act_std"), histograms=False
    )
    csv_path = tmp_path / "log.csv"
    history = model.fit(
        x,
        y,
        epochs=4,
        verbose=0,
        callbacks=[callback, keras.callbacks.CSVLogger(str(csv_path))],
    )
    keys = {f"actgrad/p{i}/{s}" for i in (0, 1) for s in ("grad_norm", "act_std")}
    assert keys <= set(history.history)
    values = history.history["actgrad/p0/grad_norm"]
    assert [math.isnan(v) for v in values] == [False, True, False, True]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert keys <= set(rows[0])
    assert len(rows) == 4
    assert float(rows[2]["actgrad/p1/act_std"]) == pytest.approx(
        history.history["actgrad/p1/act_std"][2], rel=1e-6
    )
    assert rows[1]["actgrad/p1/act_std"].lower() == "nan"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"freq": 0}, r"`freq`.*Received: freq=0"),
        ({"freq": -2}, r"Received: freq=-2"),
        ({"freq": [1, -1]}, r"Received: freq=\[1, -1\]"),
        ({"freq": "epoch"}, r"Received: freq='epoch'"),
        ({"statistics": ["grad_norm", "bogus"]}, r"bogus.*Accepted names"),
        ({"log_statistics": ["nope"]}, r"nope.*Accepted names"),
        ({"statistics": ["act_mean"]}, r"`log_statistics` \['grad_norm'\]"),
        ({"on_nonfinite": "ignore"}, r"'ignore'.*\['warn', 'raise', 'stop'\]"),
        ({"batch_freq": 0}, r"Received: batch_freq=0"),
        ({"histogram_bins": 0}, r"Received: histogram_bins=0"),
        ({"vanishing_threshold": -1.0}, r"vanishing_threshold=-1.0"),
        ({"vanishing_threshold": 10.0, "exploding_threshold": 1.0}, r"smaller"),
        ({"loss": 3}, r"Received: loss=3"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    x, y = data(4)
    with pytest.raises(ValueError, match=match):
        ActivationGradientCallback((x, y), **kwargs)


def test_bad_probe_data_forms():
    x, y = data(4)
    with pytest.raises(ValueError, match="tuple of 4 elements"):
        ActivationGradientCallback((x, y, y, y))
    with pytest.raises(ValueError, match="empty dataset or generator"):
        ActivationGradientCallback(iter([]))
    with pytest.raises(ValueError, match="must be"):
        ActivationGradientCallback(None)


def test_wrong_probe_shapes_fail_before_training():
    model = mlp()
    x, y = data()
    before = [w.copy() for w in model.get_weights()]
    callback = ActivationGradientCallback((np.zeros((4, 7), "float32"), y[:4]))
    with pytest.raises(ValueError, match=r"\(4, 7\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_no_probes_fails_before_training():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = data()
    callback = ActivationGradientCallback((x, y))
    with pytest.raises(ValueError, match="insert_probes"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_unwritable_log_dir_fails_before_training(tmp_path):
    model = mlp()
    x, y = data()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    callback = ActivationGradientCallback((x, y), log_dir=str(blocker))
    with pytest.raises(ValueError, match="cannot write TensorBoard summaries"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_compiled_once_and_reused_across_fit_calls():
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback((x[:8], y[:8]))
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    engine = get_engine(model)
    traces = engine.trace_count
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    other = ActivationGradientCallback((x[8:16], y[8:16]))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[other])
    assert engine.trace_count == traces
    assert len([e for e in callback.events if e["kind"] == "epoch"]) == 4
