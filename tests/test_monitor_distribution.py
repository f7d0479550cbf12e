"""`GradientMonitor` under distribution: the global batch's values, one device's.

The distributed runs need two devices configured before the framework
initialises, so each runs in a fresh process (`_monitor_mirrored_run.py`
on TensorFlow, `_monitor_jax_distributed_run.py` on JAX) and reports its
comparisons as JSON: the monitor's events against the same training on one
device and against a single-device twin trained by hand
(`_monitor_replay.py`), and the state trained with the monitor against the
state trained without it. Setups the monitor cannot combine are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientMonitor

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOLERANCE = 1e-4


def _run(script: str, **env: str) -> dict[str, Any]:
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, os.path.join(HERE, script)],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def _check(run: dict[str, Any]) -> None:
    assert run["steps"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run["histogram_steps"] == [1, 4, 7, 8]  # every 3 steps, and the spike
    # The last batch, weighted 1000 times, is a spike on the global batch.
    assert run["spike_steps"] == [8]
    # Every statistic, histogram range and count, weight-gradient, update
    # and update-ratio norm and the global norm, at every step.
    assert run["error_vs_one_device"] < TOLERANCE
    assert run["error_vs_replay"] < TOLERANCE
    assert run["bit_identical"] and run["same_history"]
    assert run["weights_vs_replay"] < 1e-5


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_equals_one_device() -> None:
    run = _run("_monitor_mirrored_run.py", KERAS_BACKEND="tensorflow")
    assert run["replicas"] == 2 and run["mirrored"] == "MirroredVariable"
    assert run["one_device_error_vs_replay"] < TOLERANCE
    _check(run)
    assert len(run["spike_warnings"]) == 1
    assert "training step 8" in run["spike_warnings"][0]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_keras_distribution_equals_one_device() -> None:
    run = _run(
        "_monitor_jax_distributed_run.py",
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    assert run["devices"] == 2
    assert run["one_device_error_vs_replay"] < TOLERANCE
    for name in ("DataParallel", "ModelParallel"):
        _check(run[name])
        assert run[name]["spike_warnings"] == 1
        assert run[name]["batch_layout"] == ["batch", None]
    assert run["DataParallel"]["sharded_kernels"] == {"d1": False, "d2": False}
    assert run["ModelParallel"]["sharded_kernels"] == {"d1": True, "d2": True}


def _model() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(1)]
    )
    model = keras_actgrad.insert_probes(model)
    model.compile("sgd", "mse")
    return model


def _refused(model: keras.Model) -> str:
    monitor = GradientMonitor()
    monitor.set_model(model)
    with pytest.raises(ValueError, match="Received: ") as error:
        monitor.on_train_begin()
    message = str(error.value)
    assert "MirroredStrategy" in message and "DataParallel" in message
    assert "ActivationGradientCallback" in message
    return message


@pytest.mark.skipif(BACKEND == "jax", reason="keras.distribution is supported on JAX")
def test_keras_distribution_off_jax_is_refused() -> None:
    # Keras implements keras.distribution on JAX only (its TensorFlow
    # version is an unfinished prototype; its PyTorch backend has none).
    model = _model()
    mesh = keras.distribution.DeviceMesh((1,), ["batch"], ["cpu:0"])
    keras.distribution.set_distribution(keras.distribution.DataParallel(mesh))
    try:
        message = _refused(model)
    finally:
        keras.distribution.set_distribution(None)
    assert f"DataParallel on the {BACKEND} backend" in message


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_torch_distributed_processes_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    message = _refused(_model())
    assert "torch.distributed with 2 processes" in message


def test_one_device_is_not_refused() -> None:
    model = _model()
    monitor = GradientMonitor()
    x = np.ones((8, 4), "float32")
    model.fit(x, x[:, :1], batch_size=4, verbose=0, callbacks=[monitor])
    assert [event["step"] for event in monitor.events] == [1, 2]
