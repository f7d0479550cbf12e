"""`keras.distribution.ModelParallel` on JAX: sharded kernels probe like one device.

Two CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`) must
exist before JAX initialises, hence a subprocess. The Dense kernels are
sharded by a `LayoutMap` (the script asserts they are); the activations,
gradients and the callback's statistics in `fit` are compared with a
single-device copy holding the same weights.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution.ModelParallel is checked from the JAX suite",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5

SCRIPT = """
import json
import jax, keras, numpy as np
import keras_actgrad

assert len(jax.devices()) == 2, jax.devices()


def build():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    h = keras_actgrad.GradientProbe(name="p1")(h)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    h = keras_actgrad.GradientProbe(name="p2")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    model.compile(optimizer="sgd", loss="mse")
    return model


rng = np.random.default_rng(0)
x = rng.normal(size=(8, 6)).astype("float32")
y = rng.normal(size=(8, 2)).astype("float32")
keras.utils.set_random_seed(0)
single = build()
weights = single.get_weights()


def run(model):
    out = {}
    for name, r in keras_actgrad.activation_gradients(model, x, y).items():
        out[f"{name}/activation"] = r.activation
        out[f"{name}/gradient"] = r.gradient
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), probe_at_start=True, histograms=True
    )
    model.fit(x, y, epochs=1, batch_size=8, callbacks=[callback], verbose=0)
    start = callback.events[0]
    assert start["kind"] == "start", start["kind"]
    for name, stats in start["statistics"].items():
        for stat, value in stats.items():
            out[f"start/{name}/{stat}"] = np.asarray(value)
    return out


reference = run(single)
mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], jax.devices())
layout_map = keras.distribution.LayoutMap(mesh)
layout_map["d1/kernel"] = (None, "model")
layout_map["d2/kernel"] = ("model", None)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
)
model = build()
model.set_weights(weights)
for layer in ("d1", "d2"):
    sharding = model.get_layer(layer).kernel.value.sharding
    assert len(sharding.device_set) == 2, sharding
    assert not sharding.is_fully_replicated, sharding
distributed = run(model)
errors = {}
for key, value in reference.items():
    value = np.asarray(value, dtype=np.float64)
    got = np.asarray(distributed[key], dtype=np.float64)
    if value.ndim == 0 and np.isnan(value):
        errors[key] = 0.0 if np.isnan(got) else 1.0
        continue
    scale = max(float(np.linalg.norm(value)), 1e-30)
    errors[key] = float(np.linalg.norm(got - value)) / scale
print("RESULT " + json.dumps(errors))
"""


def test_jax_model_parallel_matches_one_device(tmp_path):
    script = tmp_path / "model_parallel.py"
    script.write_text(SCRIPT)
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(
        line for line in result.stdout.splitlines() if line.startswith("RESULT ")
    )
    errors = json.loads(line[len("RESULT ") :])
    assert len(errors) == 2 * 2 + 2 * 12  # 2 probes x (2 fields + 12 statistics)
    bad = {key: error for key, error in errors.items() if not error <= RTOL}
    assert not bad, bad
