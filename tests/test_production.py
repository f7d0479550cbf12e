"""Production conditions: save/load/export, bad input, no side effects.

Each bad input must raise a clear error (what, expected, fix, "Received:")
before any weight moves; for the callback that means in `on_train_begin`,
checked by comparing every weight and the optimizer's step counter after
the failed `fit`. Side effects are checked bit for bit against a twin run
without probing.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad import (  # noqa: E402
    ActivationGradientCallback,
    GradientProbe,
    activation_gradients,
)

TENSORFLOW = keras.backend.backend() == "tensorflow"


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            GradientProbe(name="p1"),
            keras.layers.Dense(6, activation="relu", name="d2"),
            GradientProbe(name="p2"),
            keras.layers.Dense(2, name="head"),
        ],
        name="mlp",
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def plain_mlp(seed=1):
    """`mlp` without probes (different initial weights)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dense(6, activation="relu", name="d2"),
            keras.layers.Dense(2, name="head"),
        ],
        name="plain",
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 4)).astype("float32"),
        rng.normal(size=(n, 2)).astype("float32"),
    )


def snapshot(model):
    variables = list(model.variables)
    if model.optimizer is not None and model.optimizer.built:
        variables += list(model.optimizer.variables)
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in variables]


def assert_same_state(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert old.dtype == new.dtype
        assert old.tobytes() == new.tobytes()


# --- save, load, export ------------------------------------------------------


def test_keras_save_and_load_without_custom_objects(tmp_path):
    model = mlp()
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0)
    activation_gradients(model, x, y)  # a cached probe function exists
    path = str(tmp_path / "probed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    assert [type(p) for p in keras_actgrad.find_probes(loaded)] == [GradientProbe] * 2
    assert [p.name for p in keras_actgrad.find_probes(loaded)] == ["p1", "p2"]
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    # The loaded model probes like the original.
    ours, theirs = activation_gradients(model, x, y), activation_gradients(loaded, x, y)
    for name in ("p1", "p2"):
        np.testing.assert_array_equal(ours[name].gradient, theirs[name].gradient)
    # And keeps training where the original left off (optimizer restored).
    assert int(loaded.optimizer.iterations.numpy()) == 1


def test_probed_multi_output_model_keeps_output_names_through_save(tmp_path):
    # Probes after both output layers: Keras would name the reloaded outputs
    # after the probes, and the dict-keyed losses would no longer match.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = [
        keras.layers.Dense(2, name="reg")(h),
        keras.layers.Dense(3, activation="softmax", name="cls")(h),
    ]
    model = keras_actgrad.insert_probes(keras.Model(inputs, outputs))
    assert [p.name for p in keras_actgrad.find_probes(model)] == [
        "hidden_probe",
        "reg_probe",
        "cls_probe",
    ]
    model.compile("adam", loss={"reg": "mse", "cls": "sparse_categorical_crossentropy"})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = {"reg": rng.normal(size=(16, 2)).astype("float32"), "cls": np.arange(16) % 3}
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "multi.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.output_names == ["reg", "cls"]
    for ours, theirs in zip(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    # The restored dict-keyed losses still match the outputs: training and
    # probing the reloaded model work, and agree with the original.
    want = activation_gradients(model, x, y)
    got = activation_gradients(loaded, x, y)
    for name in ("reg_probe", "cls_probe", "hidden_probe"):
        np.testing.assert_array_equal(want[name].gradient, got[name].gradient)
    loaded.fit(x, y, epochs=1, verbose=0)
    # Stripping gives back the plain model, named as before.
    stripped = keras_actgrad.strip_probes(loaded)
    assert stripped.output_names == ["reg", "cls"]
    assert keras_actgrad.find_probes(stripped) == []


def test_strip_probes_on_a_loaded_model_gives_identical_predictions(tmp_path):
    model = mlp()
    path = str(tmp_path / "probed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    stripped = keras_actgrad.strip_probes(loaded)
    assert keras_actgrad.find_probes(stripped) == []
    x, _ = data()
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), stripped.predict(x, verbose=0)
    )
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), stripped.predict(x, verbose=0)
    )


def test_weights_file_moves_between_probed_and_unprobed_models(tmp_path):
    probed, plain = mlp(seed=0), plain_mlp(seed=1)
    x, _ = data()
    assert not np.allclose(probed.predict(x, verbose=0), plain.predict(x, verbose=0))
    path = str(tmp_path / "probed.weights.h5")
    probed.save_weights(path)
    plain.load_weights(path)
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), plain.predict(x, verbose=0)
    )
    # And back: weights saved without probes load into a probed model.
    other = mlp(seed=2)
    plain_path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(plain_path)
    other.load_weights(plain_path)
    np.testing.assert_array_equal(
        other.predict(x, verbose=0), plain.predict(x, verbose=0)
    )


@pytest.mark.skipif(not TENSORFLOW, reason="SavedModel export is tested on TF")
def test_export_saved_model_probes_are_identities(tmp_path):
    import tensorflow as tf

    model = mlp()
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0)
    activation_gradients(model, x, y)  # a cached probe function exists
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    artifact = tf.saved_model.load(path)
    served = artifact.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(
        served, model.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )
    # Same numbers as the model without its probes.
    stripped = keras_actgrad.strip_probes(model)
    np.testing.assert_allclose(
        served, stripped.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )


# --- bad input: activation_gradients -----------------------------------------


def check_message(error, *parts):
    message = str(error.value)
    assert "Received:" in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "x_kind, parts",
    [
        ("wrong_width", ["expects shape (None, 4)", "(16, 7)"]),
        ("wrong_rank", ["expects shape (None, 4)", "(4,)"]),
        ("strings", ["float32", "<U1", "astype"]),
        ("complex", ["float32", "complex64"]),
        ("empty", ["empty", "0 examples"]),
    ],
)
def test_bad_x_is_rejected_before_tracing(x_kind, parts):
    model = mlp()
    x, y = data()
    bad = {
        "wrong_width": np.zeros((16, 7), "float32"),
        "wrong_rank": x[0],
        "strings": np.full((16, 4), "a"),
        "complex": x.astype("complex64"),
        "empty": x[:0],
    }[x_kind]
    y_bad = y[:0] if x_kind == "empty" else y[: len(bad)] if bad.ndim == 2 else y
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        activation_gradients(model, bad, y_bad)
    check_message(error, *parts)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize(
    "y_kind, parts",
    [
        ("missing", ["needs the labels `y`", "y=None"]),
        ("wrong_rows", ["different numbers of examples", "y: [5]", "(5, 2)"]),
        ("wrong_columns", ["probe pass of model 'mlp' failed", "(16, 3)", "(None, 2)"]),
        ("strings", ["must hold numbers", "<U1"]),
    ],
)
def test_bad_labels(y_kind, parts):
    model = mlp()
    x, y = data()
    bad = {
        "missing": None,
        "wrong_rows": y[:5],
        "wrong_columns": np.zeros((16, 3), "float32"),
        "strings": np.full((16, 2), "a"),
    }[y_kind]
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        activation_gradients(model, x, bad)
    check_message(error, *parts)
    assert_same_state(before, snapshot(model))


def test_wrong_sample_weight_length():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError) as error:
        activation_gradients(model, x, y, sample_weight=np.ones(3, "float32"))
    check_message(error, "different numbers of examples", "sample_weight: [3]")


def test_never_built_model():
    model = keras.Sequential(
        [keras.layers.Dense(4), GradientProbe(name="p"), keras.layers.Dense(2)]
    )
    model.compile("sgd", "mse")
    x, y = data()
    with pytest.raises(ValueError) as error:
        activation_gradients(model, x, y)
    check_message(error, "has not been built", "keras.Input")
    assert not model.built  # the failed call did not build it either


def nested_duplicate():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), GradientProbe(name="p")],
        name="inner",
    )
    outer = keras.Sequential(
        [keras.Input((4,)), inner, GradientProbe(name="p"), keras.layers.Dense(2)],
        name="outer",
    )
    outer.compile("sgd", "mse")
    return outer


def test_duplicate_probe_names():
    x, y = data()
    with pytest.raises(ValueError) as error:
        activation_gradients(nested_duplicate(), x, y)
    check_message(error, "several probes named ['p']", "GradientProbe(name=")


class Unreached(keras.Model):
    """Creates a probe it never calls."""

    def __init__(self):
        super().__init__(name="unreached")
        self.d1 = keras.layers.Dense(8, activation="tanh")
        self.used = GradientProbe(name="used")
        self.unused = GradientProbe(name="unused")
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.used(self.d1(x)))


def unreached_model():
    keras.utils.set_random_seed(0)
    model = Unreached()
    model(np.zeros((1, 4), "float32"))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def test_unreached_probe_is_reported_not_a_crash():
    model = unreached_model()
    x, y = data()
    with pytest.warns(UserWarning, match="'unused' .* was not reached"):
        results = activation_gradients(model, x, y)
    assert results["unused"].activation is None and results["unused"].gradient is None
    assert results["used"].gradient.shape == (16, 8)


def token_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    h = GradientProbe(name="tokens")(inputs)
    h = keras.layers.Embedding(10, 3)(h)
    h = GradientProbe(name="embedded")(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 10, size=(8, 5)).astype("int32")
    return model, tokens, rng.normal(size=(8, 2)).astype("float32")


def test_probe_on_integer_tokens_is_reported_not_differentiable():
    model, tokens, y = token_model()
    with pytest.warns(UserWarning, match="'tokens' .* not floating point"):
        results = activation_gradients(model, tokens, y)
    assert results["tokens"].gradient is None
    np.testing.assert_array_equal(results["tokens"].activation, tokens)
    assert results["embedded"].gradient.shape == (8, 5, 3)


# --- bad input: the callback fails in on_train_begin -------------------------


@contextlib.contextmanager
def ours():
    """Records the warnings keras-actgrad emits during `fit`.

    (`pytest.warns` would re-emit third-party warnings raised inside `fit`
    without their module, defeating the pyproject ignores.)
    """
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = []
        yield found
    found.extend(w for w in record if "keras_actgrad" in w.filename)


def fit_fails(model, callback, x, y, error_type=ValueError):
    """Runs `fit`, expects `error_type`; checks that no weight moved."""
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]
    with pytest.raises(error_type) as error:
        model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[callback])
    # (Some backends build the optimizer's slots before `on_train_begin`;
    # the step counter shows no update was applied.)
    after = [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]
    assert_same_state(before, after)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    return error


@pytest.mark.parametrize(
    "probe_data, parts",
    [
        ((np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32")), ["(4, 3)"]),
        ((np.full((4, 4), "a"), np.zeros((4, 2), "float32")), ["<U1"]),
        ((np.zeros((0, 4), "float32"), np.zeros((0, 2), "float32")), ["empty"]),
        (np.zeros((4, 4), "float32"), ["needs the labels `y`"]),
        ((np.zeros((4, 4), "float32"), np.zeros((3, 2), "float32")), ["y: [3]"]),
        ((np.zeros((4, 4), "float32"), np.zeros((4, 5), "float32")), ["(4, 5)"]),
    ],
    ids=["shape", "dtype", "empty", "no_labels", "label_rows", "label_columns"],
)
def test_callback_bad_probe_data_fails_before_training(probe_data, parts):
    model = mlp()
    x, y = data()
    error = fit_fails(model, ActivationGradientCallback(probe_data), x, y)
    check_message(error, *parts)


def test_callback_unknown_statistic_fails_at_construction():
    with pytest.raises(ValueError) as error:
        ActivationGradientCallback(data(), statistics=["grad_norm", "grad_nrom"])
    check_message(error, "grad_nrom", "grad_norm")


def test_callback_log_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    callback = ActivationGradientCallback(data(), log_dir=str(blocker / "logs"))
    error = fit_fails(mlp(), callback, *data())
    check_message(error, "cannot write TensorBoard summaries", str(blocker))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="runs as root: a read-only (chmod 0o555) directory is still writable "
    "by root, so this check would not exercise the failure",
)
def test_callback_read_only_log_dir(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        callback = ActivationGradientCallback(data(), log_dir=str(read_only))
        error = fit_fails(mlp(), callback, *data())
        check_message(error, "cannot write TensorBoard summaries")
    finally:
        read_only.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_callback_log_dir_on_a_read_only_file_system():
    # procfs refuses new directories to every user, root included: an honest
    # unwritable location where a chmod'ed directory is not.
    callback = ActivationGradientCallback(data(), log_dir="/proc/self/actgrad_logs")
    error = fit_fails(mlp(), callback, *data())
    check_message(error, "cannot write TensorBoard summaries", "/proc/self")


def test_callback_duplicate_probe_names_fail_before_training():
    error = fit_fails(nested_duplicate(), ActivationGradientCallback(data()), *data())
    check_message(error, "several probes named ['p']")


def test_callback_never_built_model():
    model = keras.Sequential(
        [keras.layers.Dense(4), GradientProbe(name="p"), keras.layers.Dense(2)]
    )
    model.compile("sgd", "mse")
    callback = ActivationGradientCallback(data(), log_statistics=["grad_norm"])
    if not TENSORFLOW:
        # JAX's and PyTorch's `fit` build the model from the first batch's
        # shapes before `on_train_begin`: probing then simply works.
        history = model.fit(*data(), epochs=1, verbose=0, callbacks=[callback])
        assert np.isfinite(history.history["actgrad/p/grad_norm"][0])
        return
    # TensorFlow's `fit` builds it in the first training step, after
    # `on_train_begin`: a clear error before that step.
    with pytest.raises(ValueError) as error:
        model.fit(*data(), epochs=1, verbose=0, callbacks=[callback])
    check_message(error, "has not been built")
    assert not model.built


def test_callback_unreached_probe_warns_and_logs_nan():
    model = unreached_model()
    x, y = data()
    callback = ActivationGradientCallback(
        (x, y), statistics=["grad_norm", "act_mean"], log_statistics=["grad_norm"]
    )
    with ours() as record:
        history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert len(record) == 1
    assert "'unused'" in str(record[0].message)
    assert "was not reached" in str(record[0].message)
    assert np.all(np.isnan(history.history["actgrad/unused/grad_norm"]))
    assert np.all(np.isfinite(history.history["actgrad/used/grad_norm"]))
    assert len(history.history["loss"]) == 2


def test_callback_integer_probe_warns_and_training_continues():
    model, tokens, y = token_model()
    callback = ActivationGradientCallback(
        (tokens, y),
        statistics=["grad_norm", "act_mean"],
        log_statistics=["grad_norm", "act_mean"],
    )
    with ours() as record:
        history = model.fit(tokens, y, epochs=2, verbose=0, callbacks=[callback])
    assert len(record) == 1
    assert "'tokens'" in str(record[0].message)
    assert "not floating point" in str(record[0].message)
    assert np.all(np.isnan(history.history["actgrad/tokens/grad_norm"]))
    # Its activation statistics are still there: the mean token id.
    assert history.history["actgrad/tokens/act_mean"][0] == pytest.approx(tokens.mean())
    assert np.all(np.isfinite(history.history["actgrad/embedded/grad_norm"]))


# --- no side effects, bit for bit --------------------------------------------


def bn_dropout_adam(seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = GradientProbe(name="bn_out")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.4, name="drop")(h)
    h = GradientProbe(name="dropped")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def full_state(model):
    state = snapshot(model)
    seed = model.get_layer("drop").seed_generator.state
    state.append(np.array(keras.ops.convert_to_numpy(seed), copy=True))
    return state


@pytest.mark.parametrize("training", [False, True])
def test_activation_gradients_between_train_steps_changes_nothing(training):
    x, y = data(16, seed=5)

    def run(probe):
        model = bn_dropout_adam()
        keras.utils.set_random_seed(9)
        losses = [model.train_on_batch(x, y)]
        if probe:
            activation_gradients(model, x, y, training=training)
            activation_gradients(model, x[:5], y[:5], training=training)
        losses.append(model.train_on_batch(x, y))
        return losses, full_state(model)

    plain_losses, plain_state = run(False)
    probed_losses, probed_state = run(True)
    # Non-trainable (BN moving stats), trainable, optimizer slots and the
    # dropout seed state all identical; the second step saw the same state.
    assert len(plain_state) > 12
    assert_same_state(plain_state, probed_state)
    assert plain_losses == probed_losses


def test_fit_with_and_without_callback_bit_identical(tmp_path):
    x, y = data(40, seed=6)

    def run(callbacks):
        model = bn_dropout_adam()
        keras.utils.set_random_seed(12)
        history = model.fit(
            x, y, epochs=3, batch_size=8, verbose=0, callbacks=callbacks
        )
        return history.history["loss"], full_state(model)

    plain_losses, plain_state = run([])
    callback = ActivationGradientCallback(
        (x[:12], y[:12]),
        log_dir=str(tmp_path),
        training=True,
        batch_freq=2,
        probe_at_start=True,
        weight_gradients=True,
    )
    probed_losses, probed_state = run([callback])
    assert len(callback.events) >= 3 + 1 + 7
    assert_same_state(plain_state, probed_state)
    assert plain_losses == probed_losses


def test_warnings_are_ours_only():
    # The production paths above raise no stray warnings (filterwarnings=error
    # would turn them into failures); this checks the happy path explicitly.
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        activation_gradients(model, *data())


# --- faults during a run -------------------------------------------------------


class _DiskFullAfterFirstEpoch(keras.callbacks.Callback):
    """Points the summary writer's file at /dev/full: real ENOSPC errors."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            writer = self.target._writer
            writer._file.close()
            writer._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_mid_run_warns_once_and_training_continues(tmp_path):
    model = mlp()
    x, y = data()
    callback = ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), log_statistics=["grad_norm"]
    )
    full = _DiskFullAfterFirstEpoch(callback)
    with ours() as record:
        history = model.fit(x, y, epochs=4, verbose=0, callbacks=[callback, full])
    assert len(record) == 1
    assert "No space left on device" in str(record[0].message)
    assert len(history.history["loss"]) == 4
    assert np.all(np.isfinite(history.history["actgrad/p1/grad_norm"]))
    assert len(callback.events) == 4
    # The same training as without the callback.
    twin = mlp()
    twin_history = twin.fit(x, y, epochs=4, verbose=0)
    assert twin_history.history["loss"] == history.history["loss"]


# --- mixed precision on every backend ------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_probe_gradients_are_float32_and_right(policy):
    # Closed form: with a bias-free linear head w and MSE over N examples,
    # d loss / d h = 2 / N * (h @ w - y) @ w.T, computed in float64 NumPy
    # from the same weights.
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(4)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh", name="d1"),
                GradientProbe(name="h"),
                keras.layers.Dense(1, use_bias=False, name="head"),
            ]
        )
        model.compile("sgd", "mse")
    finally:
        keras.config.set_dtype_policy("float32")
    x, y = data()
    y = y[:, :1]
    result = activation_gradients(model, x, y)["h"]
    kernel, bias = (np.float64(w) for w in model.get_layer("d1").get_weights())
    w = np.float64(model.get_layer("head").get_weights()[0])
    h = np.tanh(x @ kernel + bias)
    expected = 2.0 / len(x) * (h @ w - y) @ w.T
    assert str(result.activation.dtype) == policy.split("_")[1]
    assert result.gradient.dtype == np.float32
    tolerance = 1e-2 if policy == "mixed_float16" else 6e-2
    error = np.max(np.abs(result.gradient - expected))
    assert error <= tolerance * np.max(np.abs(expected))
