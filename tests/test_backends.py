"""Every backend gives the same activations and gradients.

The models of `backend_cases.py` are built and given random weights under
TensorFlow; their weights and data are saved, and a subprocess per backend
(`KERAS_BACKEND=jax`, `torch`) loads them and runs the probe passes. The
TensorFlow engine itself is checked against hand-split `tf.GradientTape`
references in the core tests; here the other engines must agree with it.

Backends are fixed at import, so each runs in its own process; this module
runs its subprocesses once, from the TensorFlow suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientProbe
from keras_actgrad._backends.base import PassConfig
from keras_actgrad._engine import Unreduced, get_engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RTOL = 1e-5

spec = importlib.util.spec_from_file_location(
    "backend_cases", HERE / "backend_cases.py"
)
assert spec is not None and spec.loader is not None
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)

on_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the cross-backend comparison runs once, from the TensorFlow suite "
    "(it starts its own JAX and PyTorch processes)",
)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _subprocess_env(backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        **extra,
    )
    return env


def _run(args: list[str], backend: str, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, *args],
        env=_subprocess_env(backend, **extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{backend} subprocess failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    )
    return result


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial values for every variable (BN statistics included)."""
    for variable in model.variables:
        shape = tuple(variable.shape)
        if variable.path.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        variable.assign(value.astype(variable.dtype))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (the norm-wise relative error)."""
    scale = max(float(np.linalg.norm(expected)), 1e-30)
    return float(np.linalg.norm(actual.astype("float64") - expected)) / scale


@pytest.fixture(scope="module")
def saved_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cross_backend")
    rng = np.random.default_rng(1234)
    keras.utils.set_random_seed(1234)
    arrays: dict[str, np.ndarray] = {}
    for name, builder in cases.BUILDERS.items():
        model = builder()
        _randomize(model, rng)
        model.save_weights(folder / f"{name}.weights.h5")
        data = cases.make_data(name)
        np.savez(folder / f"{name}.npz", **data)
        for key, value in cases.compute(model, data).items():
            arrays[f"{name}:{key}"] = value
    np.savez(folder / "results_tensorflow.npz", **arrays)
    return folder


@on_tensorflow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_matches_tensorflow(saved_cases: Path, backend: str) -> None:
    if not _installed(backend):
        pytest.skip(
            f"{backend} is not installed (pip install keras-actgrad[{backend}])"
        )
    _run(["tests/backend_cases.py", "compute", str(saved_cases)], backend)
    expected = dict(np.load(saved_cases / "results_tensorflow.npz"))
    actual = dict(np.load(saved_cases / f"results_{backend}.npz"))
    assert sorted(actual) == sorted(expected)
    # Every case and every kind of result is compared.
    assert {key.split(":")[0] for key in expected} == set(cases.BUILDERS)
    assert any(key.endswith("@1/gradient") for key in expected)
    failures = []
    for key, reference in expected.items():
        value = actual[key]
        if reference.shape == () and np.isnan(reference):  # gradient None
            if not (value.shape == () and np.isnan(value)):
                failures.append(f"{key}: expected None, got an array")
            continue
        assert value.shape == reference.shape, key
        error = relative_error(value, reference)
        if not error <= RTOL:
            failures.append(f"{key}: relative error {error:.2e}")
    assert not failures, "\n".join(failures)


@on_tensorflow
def test_references_are_not_trivial(saved_cases: Path) -> None:
    # Gradients that are all zero would agree trivially.
    results = dict(np.load(saved_cases / "results_tensorflow.npz"))
    unconnected = {
        key for key, value in results.items() if value.shape == () and np.isnan(value)
    }
    assert unconnected == {
        "multi_io:False/mimo_aux_probe/gradient",
        "multi_io:True/mimo_aux_probe/gradient",
        "multi_io:weights/mimo_aux_dense/kernel",
        "multi_io:weights/mimo_aux_dense/bias",
        "multi_io:weights/aux/kernel",
        "multi_io:weights/aux/bias",
    }
    for key, value in results.items():
        if key.endswith("/gradient") and key not in unconnected:
            assert np.all(np.isfinite(value)), key
            assert np.linalg.norm(value) > 1e-6, key


DATA_PARALLEL = """
import json, os
import jax, keras, numpy as np
import keras_actgrad
from keras_actgrad._backends.base import PassConfig
from keras_actgrad._engine import Unreduced, get_engine

assert len(jax.devices()) == 2, jax.devices()


def build():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras_actgrad.GradientProbe(name="p1")(keras.layers.ReLU()(h))
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    h = keras_actgrad.GradientProbe(name="p2")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    model.compile(loss="mse")
    return model


rng = np.random.default_rng(0)
x = rng.normal(size=(8, 6)).astype("float32")
y = rng.normal(size=(8, 2)).astype("float32")
keras.utils.set_random_seed(0)
single = build()
weights = single.get_weights()


def run(model):
    out = {}
    for training in (False, True):
        for name, r in keras_actgrad.activation_gradients(
            model, x, y, training=training
        ).items():
            out[f"{training}/{name}/activation"] = r.activation
            out[f"{training}/{name}/gradient"] = r.gradient
    engine = get_engine(model)
    full = engine.run(
        engine.prepare(x, y), PassConfig("model", False, True, Unreduced())
    ).outputs
    for path, g in full["weight_gradients"].items():
        out["weights/" + path] = np.asarray(g)
    return out


reference = run(single)
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=jax.devices())
)
model = build()
model.set_weights(weights)
kernel = model.get_layer("d1").kernel.value
assert len(kernel.sharding.device_set) == 2, kernel.sharding
# The probe batch is split across the two devices.
from keras_actgrad._backends.jax import _distribute
assert len(_distribute(x).sharding.device_set) == 2
distributed = run(model)
errors = {}
for key, value in reference.items():
    scale = max(float(np.linalg.norm(value)), 1e-30)
    errors[key] = float(np.linalg.norm(distributed[key] - value)) / scale
print("RESULT " + json.dumps(errors))
"""


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution.DataParallel is checked from the JAX suite "
    "(in a subprocess with two CPU devices)",
)
def test_jax_data_parallel_matches_one_device(tmp_path: Path) -> None:
    script = tmp_path / "data_parallel.py"
    script.write_text(DATA_PARALLEL)
    result = _run(
        [str(script)],
        "jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    line = next(
        line for line in result.stdout.splitlines() if line.startswith("RESULT ")
    )
    errors: dict[str, Any] = json.loads(line[len("RESULT ") :])
    assert len(errors) == 4 * 2 + 8  # 2 probes x 2 fields x 2 modes, 8 weights
    bad = {key: error for key, error in errors.items() if not error <= RTOL}
    assert not bad, bad


def test_tensorboard_writer_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keras_actgrad._tensorboard import EventWriter

    # `None` in sys.modules makes `import tensorboard...` raise ImportError.
    for name in list(sys.modules):
        if name == "tensorboard" or name.startswith("tensorboard."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install \"keras-actgrad\[report\]\""):
        EventWriter(str(tmp_path))
    assert not (tmp_path / "actgrad").exists()


# Engine semantics on the backend under test (the suite runs once per
# backend), against closed forms.


def _closed_form_model() -> keras.Model:
    inputs = keras.Input((4,))
    x = GradientProbe(name="input_probe")(inputs)  # nothing trainable upstream
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(x)
    h = GradientProbe(name="hidden_probe")(h)
    outputs = keras.layers.Dense(3, use_bias=False, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse")
    return model


def test_gradient_matches_closed_form() -> None:
    # loss = mean((h W - y)^2) over n x k entries, so
    # dL/dh = 2 / (n k) (h W - y) W^T and dL/dx = (dL/dh * (1 - h^2)) V^T.
    keras.utils.set_random_seed(3)
    model = _closed_form_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.normal(size=(6, 3)).astype("float32")
    results = keras_actgrad.activation_gradients(model, x, y)
    kernel, bias = (
        np.asarray(w, "float64") for w in model.get_layer("hidden").get_weights()
    )
    head = np.asarray(model.get_layer("head").get_weights()[0], "float64")
    h = np.tanh(x.astype("float64") @ kernel + bias)
    dh = 2.0 / y.size * (h @ head - y) @ head.T
    dx = (dh * (1 - h**2)) @ kernel.T
    assert list(results) == ["input_probe", "hidden_probe"]
    np.testing.assert_allclose(results["hidden_probe"].activation, h, rtol=1e-5)
    np.testing.assert_allclose(
        results["hidden_probe"].gradient, dh, rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(results["input_probe"].activation, x)
    np.testing.assert_allclose(
        results["input_probe"].gradient, dx, rtol=1e-4, atol=1e-7
    )
    for result in results.values():
        assert isinstance(result.gradient, np.ndarray)
        assert result.gradient.dtype == np.float32


def test_non_float_probe_has_no_gradient() -> None:
    inputs = keras.Input((5,), dtype="int32")
    ids = GradientProbe(name="ids")(inputs)
    h = keras.layers.Embedding(10, 3, name="embedding")(ids)
    h = GradientProbe(name="embedded")(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    x = np.arange(10, dtype="int32").reshape(2, 5)
    with pytest.warns(UserWarning, match="not floating point"):
        results = keras_actgrad.activation_gradients(model, x, loss="sum")
    assert results["ids"].gradient is None
    np.testing.assert_array_equal(results["ids"].activation, x)
    # d sum(Dense(flatten(e))) / d e = the Dense kernel, for every example.
    kernel = np.asarray(model.layers[-1].kernel.numpy()).reshape(5, 3)
    np.testing.assert_allclose(results["embedded"].gradient, np.stack([kernel] * 2))


def test_compiled_once_per_input_signature() -> None:
    model = _closed_form_model()
    engine = get_engine(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 3))
    for _ in range(3):
        keras_actgrad.activation_gradients(model, x, y)
    assert engine.trace_count == 1
    keras_actgrad.activation_gradients(model, x[:5], y[:5])
    assert engine.trace_count == 2
    keras_actgrad.activation_gradients(model, x, y)
    assert engine.trace_count == 2


def test_probe_pass_changes_no_state() -> None:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="d")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.5)(GradientProbe(name="p")(h))
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 2), "float32")
    model.train_on_batch(x, y)  # builds the optimizer
    before = [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]
    first = keras_actgrad.activation_gradients(model, x, y, training=True)
    second = keras_actgrad.activation_gradients(model, x, y, training=True)
    after = [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert old.tobytes() == new.tobytes()
    # The dropout seed did not move either: the same mask twice.
    np.testing.assert_array_equal(first["p"].gradient, second["p"].gradient)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch autograd only")
def test_torch_keeps_no_graph() -> None:
    import gc
    import weakref

    import torch

    model = _closed_form_model()
    seen: list[weakref.ref] = []

    def loss(y_true: Any, y_pred: Any) -> Any:
        seen.append(weakref.ref(y_pred))
        # The product's backward saves y_pred: alive as long as the graph is.
        return keras.ops.mean(y_pred * y_pred - y_true)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 4)).astype("float32"), rng.normal(size=(4, 3))
    seen_by_reducer: list[Any] = []

    class Recording(Unreduced):
        key = "recording"

        def __call__(self, *args: Any) -> Any:
            out = super().__call__(*args)
            # A copy of the containers: the engine empties the output's own
            # as it converts them (one tensor alive twice at a time).
            seen_by_reducer.append(
                {k: dict(v) if isinstance(v, dict) else v for k, v in out.items()}
            )
            return out

    engine = get_engine(model)
    engine.run(
        engine.prepare(x, y.astype("float32"), None, loss),
        PassConfig(loss, False, True, Recording()),
    )
    out = seen_by_reducer[0]
    gc.collect()
    assert seen and seen[0]() is None  # the graph is gone
    tensors = [out["loss"], *out["activations"].values(), *out["gradients"].values()]
    tensors += list(out["weight_gradients"].values())
    for tensor in tensors:
        assert isinstance(tensor, torch.Tensor)
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert all(v.value.grad is None for v in model.trainable_variables)


@pytest.fixture
def mixed_float16() -> Any:
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_float16_gradients_are_loss_scaled(mixed_float16: Any) -> None:
    # loss = 1e-8 * sum(h): d loss / d h = 1e-8 everywhere, below float16's
    # smallest subnormal (6e-8): without loss scaling it would be 0.
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name="dense")(inputs)
    h = GradientProbe(name="p")(h)
    outputs = keras.layers.Lambda(lambda t: 1e-8 * keras.ops.cast(t, "float32"))(h)
    model = keras.Model(inputs, outputs)
    x = np.ones((2, 3), "float32")
    results = keras_actgrad.activation_gradients(model, x, loss="sum")
    assert results["p"].activation.dtype == np.float16
    assert results["p"].gradient.dtype == np.float32
    np.testing.assert_allclose(results["p"].gradient, np.full((2, 4), 1e-8), rtol=1e-3)


def test_float16_overflowing_scale_is_reduced(mixed_float16: Any) -> None:
    # d loss / d h = 10: scaled by 2**15 it overflows float16 (max 65504);
    # the scale is divided until it does not.
    inputs = keras.Input((3,))
    h = GradientProbe(name="p")(keras.layers.Dense(4, name="dense")(inputs))
    outputs = keras.layers.Lambda(lambda t: 10.0 * keras.ops.cast(t, "float32"))(h)
    model = keras.Model(inputs, outputs)
    results = keras_actgrad.activation_gradients(
        model, np.ones((2, 3), "float32"), loss="sum"
    )
    np.testing.assert_allclose(results["p"].gradient, np.full((2, 4), 10.0))
