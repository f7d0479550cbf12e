"""ActivationGradientCallback: logs, schedules, probe data, alerts, errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

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


def test_history_matches_activation_gradients_at_same_weights():
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback(
        (x[:16], y[:16]), histograms=False, log_statistics=["grad_norm"]
    )
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


def test_same_keys_every_epoch_carried_when_not_probed(tmp_path):
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
    keys.add("actgrad/grad_norm_ratio")
    assert keys <= set(history.history)
    # Probed epochs 0 and 2; epochs 1 and 3 carry the last measured value.
    events = [e["statistics"] for e in callback.events]
    for key in keys - {"actgrad/grad_norm_ratio"}:
        probe, statistic = key.split("/")[1:]
        expected = [events[0][probe][statistic]] * 2 + [events[1][probe][statistic]] * 2
        assert history.history[key] == pytest.approx(expected, rel=1e-6)
    ratios = [e["p0"]["grad_norm"] / e["p1"]["grad_norm"] for e in events]
    assert history.history["actgrad/grad_norm_ratio"] == pytest.approx(
        [ratios[0], ratios[0], ratios[1], ratios[1]], rel=1e-6
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert keys <= set(rows[0])
    assert len(rows) == 4
    assert float(rows[2]["actgrad/p1/act_std"]) == pytest.approx(
        history.history["actgrad/p1/act_std"][2], rel=1e-6
    )
    assert rows[1]["actgrad/p1/act_std"] == rows[0]["actgrad/p1/act_std"]


def test_default_logs_one_compact_value(capsys):
    """By default the progress bar gets `actgrad/grad_norm_ratio` only, and no
    `nan` on epochs that were not probed (the first is the pre-training
    check pass's value)."""
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback((x, y), freq=[1], histograms=False)
    history = model.fit(x, y, epochs=3, verbose=2, callbacks=[callback])
    ours = [key for key in history.history if key.startswith("actgrad")]
    assert ours == ["actgrad/grad_norm_ratio"]
    ratios = history.history["actgrad/grad_norm_ratio"]
    assert all(math.isfinite(v) for v in ratios)
    event = callback.events[0]["statistics"]
    assert (
        ratios[1]
        == ratios[2]
        == pytest.approx(event["p0"]["grad_norm"] / event["p1"]["grad_norm"], rel=1e-6)
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "loss" in line]
    assert len(lines) == 3
    for line in lines:
        assert line.count("actgrad") == 1 and "nan" not in line


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"freq": 0}, r"`freq`.*Received: freq=0"),
        ({"freq": -2}, r"Received: freq=-2"),
        ({"freq": [1, -1]}, r"Received: freq=\[1, -1\]"),
        ({"freq": "epoch"}, r"Received: freq='epoch'"),
        ({"statistics": ["grad_norm", "bogus"]}, r"bogus.*Accepted names"),
        ({"log_statistics": ["nope"]}, r"nope.*Accepted names"),
        (
            {"statistics": ["act_mean"], "log_statistics": ["grad_norm"]},
            r"`log_statistics` \['grad_norm'\]",
        ),
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


# Schedules.


def probed_epochs(callback, kind="epoch"):
    return [e["epoch"] for e in callback.events if e["kind"] == kind]


@pytest.mark.parametrize(
    "freq, epochs, expected",
    [
        (1, 3, [0, 1, 2]),
        (3, 5, [0, 3]),
        ([0, 2], 4, [0, 2]),
        ((1,), 3, [1]),
        (lambda epoch: epoch == 3, 4, [3]),
    ],
)
def test_freq(freq, epochs, expected):
    model = mlp()
    x, y = data(8)
    callback = ActivationGradientCallback(
        (x, y), freq=freq, histograms=False, log_statistics=["grad_norm"]
    )
    history = model.fit(x, y, epochs=epochs, verbose=0, callbacks=[callback])
    assert probed_epochs(callback) == expected
    # Every epoch has a value: a probed epoch's own, else the last measured.
    logged = history.history["actgrad/p0/grad_norm"]
    assert len(logged) == epochs and all(math.isfinite(v) for v in logged)
    measured = {e["epoch"]: e["statistics"]["p0"]["grad_norm"] for e in callback.events}
    last = None  # before the first probed epoch: the pre-training check's value
    for epoch in range(epochs):
        last = measured.get(epoch, last)
        if last is not None:
            assert logged[epoch] == pytest.approx(last, rel=1e-6)


def test_batch_freq_and_probe_at_start():
    model = mlp()
    x, y = data(32)
    initial = keras_actgrad.activation_gradients(model, x[:8], y[:8])
    callback = ActivationGradientCallback(
        (x[:8], y[:8]),
        batch_freq=5,
        probe_at_start=True,
        freq=[2],
        histograms=False,
        log_statistics=["grad_norm"],
    )
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    kinds = [(e["kind"], e["epoch"], e["step"]) for e in callback.events]
    # 4 steps an epoch: global steps 5 and 10; the epoch event comes last.
    assert kinds == [
        ("start", None, 0),
        ("batch", 1, 5),
        ("batch", 2, 10),
        ("epoch", 2, 2),
    ]
    start = callback.events[0]["statistics"]
    for probe, result in initial.items():
        assert start[probe]["grad_norm"] == pytest.approx(grad_norm(result), rel=1e-5)
    # Batch events do not go to `logs`.
    assert len(history.history["actgrad/p0/grad_norm"]) == 3
    batch = callback.to_numpy("batch")
    assert batch["step"].tolist() == [5, 10]
    assert batch["actgrad/p1/grad_norm"].shape == (2,)
    assert np.isnan(callback.to_numpy("start")["epoch"]).all()


def test_batch_freq_counts_global_steps_across_fit_calls():
    model = mlp()
    x, y = data(24)
    callback = ActivationGradientCallback((x, y), batch_freq=4, histograms=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    steps = [e["step"] for e in callback.events if e["kind"] == "batch"]
    assert steps == [4, 8]


# Probe data forms.


def last_epoch_stats(callback):
    return [e for e in callback.events if e["kind"] == "epoch"][-1]["statistics"]


def assert_matches(callback, model, x, y=None, **kwargs):
    stats = last_epoch_stats(callback)
    results = keras_actgrad.activation_gradients(model, x, y, **kwargs)
    for probe, result in results.items():
        assert stats[probe]["grad_norm"] == pytest.approx(grad_norm(result), rel=1e-5)


def test_tf_data_dataset_first_batch_kept():
    import tensorflow as tf

    model = mlp()
    x, y = data(32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    callback = ActivationGradientCallback(dataset, histograms=False)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert_matches(callback, model, x[:8], y[:8])


def test_generator_first_batch_taken_once():
    model = mlp()
    x, y = data(32)
    taken = []

    def batches():
        for i in range(4):
            taken.append(i)
            yield x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)]

    callback = ActivationGradientCallback(batches(), histograms=False)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert taken == [0]
    assert_matches(callback, model, x[:8], y[:8])


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.x[8 * index : 8 * (index + 1)], self.y[8 * index : 8 * (index + 1)]


def test_py_dataset():
    model = mlp()
    x, y = data(32)
    callback = ActivationGradientCallback(_Batches(x, y), histograms=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert_matches(callback, model, x[:8], y[:8])


def test_x_alone_with_sum_loss():
    model = mlp()
    x, y = data(16)
    callback = ActivationGradientCallback(x[:4], loss="sum", histograms=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert_matches(callback, model, x[:4], loss="sum")


def test_dict_inputs():
    keras.utils.set_random_seed(0)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(4, activation="relu")(h)
    h = keras_actgrad.GradientProbe(name="joined")(h)
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x = {
        "a": rng.normal(size=(8, 3)).astype("float32"),
        "b": rng.normal(size=(8, 2)).astype("float32"),
    }
    y = rng.normal(size=(8, 1)).astype("float32")
    callback = ActivationGradientCallback((x, y), histograms=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert_matches(callback, model, x, y)


def test_sample_weights():
    model = mlp()
    x, y = data(8)
    weights = np.array([1, 0, 0, 2, 1, 0, 1, 0], "float32")
    callback = ActivationGradientCallback((x, y, weights), histograms=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert_matches(callback, model, x, y, sample_weight=weights)
    unweighted = keras_actgrad.activation_gradients(model, x, y)
    assert last_epoch_stats(callback)["p0"]["grad_norm"] != pytest.approx(
        grad_norm(unweighted["p0"]), rel=1e-3
    )


# A multi-output model whose `aux` output has no loss (`backend_cases.multi_io`).


def _relu(t):
    return np.maximum(t, 0.0)


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def multi_io_reference(model, x, y):
    """`{probe: (activation, gradient)}` of `multi_io`, by hand in float64.

    The compiled loss is mse(out1) + 0.5 * binary_crossentropy(out2), each a
    mean over the batch (and mse over out1's 2 columns); `aux` has no loss,
    so its probe has no gradient (None).
    """
    weights = {
        name: [np.asarray(w, "float64") for w in model.get_layer(name).get_weights()]
        for name in ("mimo_da", "mimo_db", "mimo_dense", "out1", "out2")
        + ("mimo_aux_dense",)
    }

    def dense(name, h):
        kernel, bias = weights[name]
        return h @ kernel + bias

    a, b = np.asarray(x["a"], "float64"), np.asarray(x["b"], "float64")
    ha, hb = _relu(dense("mimo_da", a)), _relu(dense("mimo_db", b))
    h = _sigmoid(dense("mimo_dense", np.concatenate([ha, hb], axis=1)))
    out1, out2 = dense("out1", h), _sigmoid(dense("out2", h))
    # d loss / d out1, and d loss / d (out2's logit): (p - y) through the sigmoid.
    d_out1 = 2.0 * (out1 - y["out1"]) / out1.size
    d_logit2 = 0.5 * (out2 - y["out2"]) / len(out2)
    d_h = d_out1 @ weights["out1"][0].T + d_logit2 @ weights["out2"][0].T
    d_joined = (d_h * h * (1.0 - h)) @ weights["mimo_dense"][0].T
    units = ha.shape[1]
    return {
        "mimo_shared": (ha, d_joined[:, :units]),
        "mimo_shared@1": (hb, d_joined[:, units:]),
        "mimo_h": (h, d_h),
        "mimo_aux_probe": (_relu(dense("mimo_aux_dense", a)), None),
    }


def reference_statistics(activation, gradient):
    """The README's statistics of one probe, in NumPy (NaN: no gradient)."""
    out = {
        "act_mean": activation.mean(),
        "act_std": activation.std(),
        "act_zero_fraction": np.mean(activation == 0),
        "dead_unit_fraction": np.mean(np.all(activation == 0, axis=0)),
    }
    names = ("grad_norm", "grad_mean_abs", "grad_std", "grad_max_abs")
    names += ("grad_zero_fraction", "sample_grad_norm_mean")
    names += ("sample_grad_norm_max", "nonfinite")
    if gradient is None:
        return {**out, **dict.fromkeys(names, math.nan)}
    per_example = np.sqrt(np.sum(gradient**2, axis=1))
    values = (
        np.sqrt(np.sum(gradient**2)),
        np.abs(gradient).mean(),
        gradient.std(),
        np.abs(gradient).max(),
        np.mean(gradient == 0),
        per_example.mean(),
        per_example.max(),
        np.sum(~np.isfinite(gradient)),
    )
    return {**out, **dict(zip(names, values, strict=True))}


def test_multi_output_model_with_an_output_without_loss():
    # Regression (JAX): a probe pass run before the compiled loss was built
    # (here `activation_gradients` before `fit`) built its per-output loss
    # trackers inside the traced pass, with leaked tracers for values; the
    # callback's pass then failed on its second run ("Execution supplied 13
    # arguments but compiled program expected 20").
    from tests.backend_cases import multi_io

    keras.utils.set_random_seed(0)
    model = multi_io()
    rng = np.random.default_rng(0)
    x = {
        "a": rng.normal(size=(16, 5)).astype("float32"),
        "b": rng.normal(size=(16, 3)).astype("float32"),
    }
    y = {
        "out1": rng.normal(size=(16, 2)).astype("float32"),
        "out2": rng.integers(0, 2, (16, 1)).astype("float32"),
    }
    before = keras_actgrad.activation_gradients(model, x, y)
    assert before["mimo_aux_probe"].gradient is None
    # The model's state is concrete, not left over from a trace.
    for variable in model.variables + model.metrics_variables:
        np.asarray(keras.ops.convert_to_numpy(variable.value))

    callback = ActivationGradientCallback(
        (x, y), histograms=False, log_statistics=["grad_norm", "act_mean"]
    )
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    expected = multi_io_reference(model, x, y)
    assert callback.probe_order == list(expected)
    events = [e["statistics"] for e in callback.events if e["kind"] == "epoch"]
    assert len(events) == 3
    for probe, (activation, gradient) in expected.items():
        reference = reference_statistics(activation, gradient)
        assert set(events[-1][probe]) == set(reference)
        for statistic, value in reference.items():
            got = events[-1][probe][statistic]
            if math.isnan(value):
                assert math.isnan(got), (probe, statistic)
            else:
                assert got == pytest.approx(value, rel=1e-4, abs=1e-7), (
                    probe,
                    statistic,
                )
        # Training moved the weights with a gradient: each epoch's pass saw
        # its own. `mimo_aux_dense` gets none, so `aux`'s activation stays.
        first, last = events[0][probe], events[-1][probe]
        if gradient is None:
            assert first["act_mean"] == last["act_mean"]
        else:
            assert first["act_mean"] != last["act_mean"]
            assert first["grad_norm"] != last["grad_norm"]
    # The probe without a loss: NaN gradient statistics in `logs` too, as on
    # every backend.
    norms = history.history["actgrad/mimo_aux_probe/grad_norm"]
    assert len(norms) == 3 and all(math.isnan(v) for v in norms)
    assert all(
        math.isfinite(v) for v in history.history["actgrad/mimo_aux_probe/act_mean"]
    )
    # A pass of another configuration after `fit` agrees with the reference.
    after = keras_actgrad.activation_gradients(model, x, y)
    assert list(after) == list(expected)
    for probe, (activation, gradient) in expected.items():
        # float32 against the float64 reference: an entry much smaller than
        # the largest ones carries their rounding (PyTorch: 5e-8 on 0.002).
        np.testing.assert_allclose(
            after[probe].activation,
            activation,
            rtol=1e-5,
            atol=1e-6 * float(np.abs(activation).max()),
        )
        if gradient is None:
            assert after[probe].gradient is None
        else:
            scale = float(np.abs(gradient).max())
            np.testing.assert_allclose(
                after[probe].gradient, gradient, rtol=1e-4, atol=1e-6 * scale
            )


# Keras callbacks reading our keys.


def test_early_stopping_on_gradient_key():
    model = mlp()
    model.compile(keras.optimizers.SGD(0.0), "mse")  # weights stay put
    x, y = data()
    callback = ActivationGradientCallback(
        (x, y), histograms=False, log_statistics=["grad_norm"]
    )
    # A constant gradient norm does not improve: EarlyStopping stops after
    # epoch 1, which only happens if it sees the key.
    stopper = keras.callbacks.EarlyStopping(
        monitor="actgrad/p1/grad_norm", mode="min", patience=1
    )
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[callback, stopper])
    assert len(history.history["loss"]) == 2
    assert stopper.stopped_epoch == 1
    assert stopper.best == history.history["actgrad/p1/grad_norm"][0]


# Training is untouched.


def bn_dropout_model():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras_actgrad.GradientProbe(name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.3)(h)
    h = keras_actgrad.GradientProbe(name="dropped")(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def fit_state(callbacks):
    model = bn_dropout_model()
    x, y = data(48, seed=7)
    keras.utils.set_random_seed(11)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=callbacks)
    return (
        [v.numpy() for v in model.variables],
        [v.numpy() for v in model.optimizer.variables],
    )


def test_training_bit_identical_with_and_without_callback():
    x, y = data(48, seed=7)
    weights, slots = fit_state([])
    callback = ActivationGradientCallback(
        (x[:16], y[:16]),
        training=True,
        batch_freq=2,
        probe_at_start=True,
        weight_gradients=True,
    )
    probed_weights, probed_slots = fit_state([callback])
    assert len(callback.events) > 5
    assert len(weights) == len(probed_weights) and len(slots) == len(probed_slots)
    for a, b in zip(weights, probed_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, probed_slots, strict=True):
        np.testing.assert_array_equal(a, b)


# Alerts.


def sqrt_chain():
    """p0 -> sqrt|.| -> p1 -> sqrt|.| -> Dense: zeros in x give inf gradients."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    h = keras_actgrad.GradientProbe(name="p0")(inputs)
    h = keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t)))(h)
    h = keras_actgrad.GradientProbe(name="p1")(h)
    h = keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t)))(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    x = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]], "float32")
    y = np.ones((2, 1), "float32")
    return model, x, y


@contextlib.contextmanager
def recorded():
    """Records only the warnings keras-actgrad emits."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours: list[warnings.WarningMessage] = []
        yield ours
    ours.extend(w for w in record if "keras_actgrad" in w.filename)


def test_nonfinite_warns_once_naming_first_probe():
    model, x, y = sqrt_chain()
    callback = ActivationGradientCallback((x, y), histograms=False)
    with recorded() as record:
        history = model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert len(record) == 1
    message = str(record[0].message)
    assert "Non-finite" in message and "probe 'p0'" in message
    assert "epoch 0" in message
    assert len(history.history["loss"]) == 3
    assert last_epoch_stats(callback)["p0"]["nonfinite"] == 2


def test_nonfinite_raise():
    model, x, y = sqrt_chain()
    callback = ActivationGradientCallback((x, y), on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="probe 'p0'"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])


def test_nonfinite_stop():
    model, x, y = sqrt_chain()
    callback = ActivationGradientCallback((x, y), on_nonfinite="stop")
    with recorded() as record:
        history = model.fit(x, y, epochs=5, verbose=0, callbacks=[callback])
    assert len(history.history["loss"]) == 1
    assert "Training stops" in str(record[0].message)


def test_finite_gradients_give_no_alert():
    model = mlp()
    x, y = data()
    with recorded() as record:
        model.fit(
            x, y, epochs=2, verbose=0, callbacks=[ActivationGradientCallback((x, y))]
        )
    assert record == []


def scaled_chain(scale):
    """Two linear layers of kernel `scale * I` between the first and last probe.

    d loss / d p0 = scale**2 * d loss / d p2 exactly, so grad_norm(p0) /
    grad_norm(p2) = scale**2.
    """
    keras.utils.set_random_seed(0)
    init = keras.initializers.Identity(gain=scale)
    inputs = keras.Input((4,))
    h = keras_actgrad.GradientProbe(name="p0")(inputs)
    h = keras.layers.Dense(4, kernel_initializer=init, use_bias=False)(h)
    h = keras_actgrad.GradientProbe(name="p1")(h)
    h = keras.layers.Dense(4, kernel_initializer=init, use_bias=False)(h)
    h = keras_actgrad.GradientProbe(name="p2")(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


@pytest.mark.parametrize("scale, alert", [(1e-3, "Vanishing"), (1e3, "Exploding")])
def test_vanishing_and_exploding(scale, alert):
    model = scaled_chain(scale)
    x, y = data(8)
    callback = ActivationGradientCallback((x, y), histograms=False)
    with recorded() as record:
        model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(alert) and "'p0'" in message and "'p2'" in message
    stats = last_epoch_stats(callback)
    ratio = stats["p0"]["grad_norm"] / stats["p2"]["grad_norm"]
    assert ratio == pytest.approx(scale**2, rel=1e-4)


def test_thresholds_are_configurable():
    model = scaled_chain(1e-3)
    x, y = data(8)
    callback = ActivationGradientCallback(
        (x, y), histograms=False, vanishing_threshold=1e-7
    )
    with recorded() as record:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert record == []


def test_deep_sigmoid_net_vanishes():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8,))]
    for i in range(12):
        layers.append(keras.layers.Dense(8, activation="sigmoid"))
        if i in (0, 11):
            layers.append(keras_actgrad.GradientProbe(name=f"p{i}"))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    y = np.ones((16, 1), "float32")
    callback = ActivationGradientCallback((x, y), histograms=False)
    with recorded() as record:
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert [str(w.message).split(" ")[0] for w in record] == ["Vanishing"]


def test_batch_hook_only_with_batch_freq():
    # Keras dispatches batch-end callbacks without a device sync per step
    # only when no callback overrides the batch hooks (it checks the
    # `_is_default` marker of `keras.callbacks.Callback`'s methods).
    x, y = data(4)
    plain = ActivationGradientCallback((x, y))
    assert getattr(plain.on_train_batch_end, "_is_default", False)
    assert getattr(plain.on_batch_end, "_is_default", False)
    batched = ActivationGradientCallback((x, y), batch_freq=2)
    assert not getattr(batched.on_train_batch_end, "_is_default", False)
