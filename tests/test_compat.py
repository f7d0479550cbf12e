"""Paths that broke on older Keras and JAX releases, checked on every version.

The compatibility run (noxfile.py) runs these, with the rest of the tests
marked `compat`, on the oldest and the newest supported versions; the main
suite runs them on the versions it installs. Each would have caught a
failure of an older release:

- the step numbers of both callbacks come from the optimizer's
  `iterations`, which `LossScaleOptimizer` did not advance in Keras 3.8, so
  that under mixed precision every `fit` restarted at step 0;
- with `steps_per_execution`, Keras 3.10 and earlier called
  `on_train_batch_end` with the first step of each group, so that a
  `batch_freq` event measured other weights than its step's;
- under Keras's NNX mode on JAX the trainer ignores the monitor's step: it
  must refuse before the first batch trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_actgrad

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parent.parent
BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 6)).astype("float32")
Y = (np.arange(32) % 3).astype("int32")


def _model(steps_per_execution: int = 1) -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits", dtype="float32"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return keras_actgrad.insert_probes(model)


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def test_step_numbers_continue_across_fits_under_mixed_precision(mixed_float16):
    model = _model()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    keras.config.set_dtype_policy("float32")  # the model is built
    monitor = keras_actgrad.GradientMonitor(weight_gradients=False)
    callback = keras_actgrad.ActivationGradientCallback(
        (X[:8], Y[:8]), batch_freq=1, histograms=False, statistics=("grad_norm",)
    )
    for _ in range(2):  # two fits of 2 steps each: steps 1-4, counted on
        model.fit(
            X[:16], Y[:16], batch_size=8, verbose=0, callbacks=[monitor, callback]
        )
    assert [event["step"] for event in monitor.events] == [1, 2, 3, 4]
    batch_steps = [e["step"] for e in callback.events if e["kind"] == "batch"]
    assert batch_steps == [1, 2, 3, 4]
    # The optimizer really took 4 steps (independent of the callbacks' count).
    inner = model.optimizer.inner_optimizer
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 4


def _grad_norms_by_hand(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list:
    """||d loss / d probe output|| from `activation_gradients`' raw arrays."""
    results = keras_actgrad.activation_gradients(model, x, y)
    return [float(np.linalg.norm(result.gradient)) for result in results.values()]


@pytest.mark.skipif(
    BACKEND == "torch", reason="Keras runs steps_per_execution=1 only on PyTorch"
)
def test_batch_events_with_steps_per_execution():
    model = _model(steps_per_execution=2)
    callback = keras_actgrad.ActivationGradientCallback(
        (X[:8], Y[:8]), batch_freq=2, histograms=False, statistics=("grad_norm",)
    )
    model.fit(
        X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
    )
    batch = [event for event in callback.events if event["kind"] == "batch"]
    assert [event["step"] for event in batch] == [2, 4]
    # A replay: the same model trained one step at a time, measured after
    # step 2 and step 4 by hand.
    twin = _model()
    for event, steps in zip(batch, (2, 2), strict=True):
        start = (event["step"] - steps) * 8
        twin.fit(
            X[start : start + steps * 8],
            Y[start : start + steps * 8],
            batch_size=8,
            shuffle=False,
            verbose=0,
        )
        expected = _grad_norms_by_hand(twin, X[:8], Y[:8])
        measured = [
            event["statistics"][probe]["grad_norm"] for probe in callback.probe_order
        ]
        np.testing.assert_allclose(measured, expected, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="NNX is a mode of the JAX backend")
def test_the_monitor_refuses_nnx_mode(monkeypatch):
    """The check itself, on any Keras (NNX mode is reported as on)."""
    if not hasattr(keras.config, "is_nnx_enabled"):
        pytest.skip("this Keras has no NNX mode")
    model = _model()
    before = [np.array(w) for w in model.get_weights()]
    monkeypatch.setattr(keras.config, "is_nnx_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"NNX.*Received: keras\.config"):
        model.fit(X, Y, verbose=0, callbacks=[keras_actgrad.GradientMonitor()])
    for weight, old in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weight, old)  # before the first batch


_NNX_RUN = """
import keras
import numpy as np
import keras_actgrad

assert keras.config.is_nnx_enabled()
x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
y = (np.arange(32) % 3).astype("int32")
model = keras.Sequential(
    [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
)
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model = keras_actgrad.insert_probes(model)
before = [np.array(w) for w in model.get_weights()]
try:
    model.fit(x, y, verbose=0, callbacks=[keras_actgrad.GradientMonitor()])
except ValueError as error:
    assert "NNX" in str(error), error
else:
    raise AssertionError("GradientMonitor ran under NNX")
for weight, old in zip(model.get_weights(), before):
    np.testing.assert_array_equal(weight, old)
# The alternative the error names works on the same model.
callback = keras_actgrad.ActivationGradientCallback((x[:8], y[:8]), batch_freq=1)
model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
assert [e["step"] for e in callback.events if e["kind"] == "batch"] == [1, 2, 3, 4]
grad_norm = callback.events[-1]["statistics"][callback.probe_order[0]]["grad_norm"]
assert np.isfinite(grad_norm) and grad_norm > 0, grad_norm
print("ok")
"""


@pytest.mark.skipif(BACKEND != "jax", reason="NNX is a mode of the JAX backend")
def test_nnx_mode_for_real(tmp_path):
    """A real NNX run (Keras imported with `KERAS_NNX_ENABLED`, needs flax)."""
    pytest.importorskip("flax", reason="Keras's NNX mode needs flax")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        KERAS_NNX_ENABLED="true",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NNX_RUN)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]
