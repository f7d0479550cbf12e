"""TensorBoard output, read back with TensorBoard's own reader and server."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.util import tensor_util  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad import ActivationGradientCallback  # noqa: E402


def model_and_data(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, activation="relu", name="d0")(inputs)
    h = keras_actgrad.GradientProbe(name="p0")(h)
    h = keras.layers.Dense(6, activation="tanh", name="d1")(h)
    h = keras_actgrad.GradientProbe(name="p1")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    return model, x, y


@contextlib.contextmanager
def our_warnings():
    """Records the warnings keras-actgrad emits (others are third-party noise)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours: list[warnings.WarningMessage] = []
        yield ours
    ours.extend(w for w in record if "keras_actgrad" in w.filename)


def read(directory):
    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def values(accumulator, tag):
    return [
        (event.step, tensor_util.make_ndarray(event.tensor_proto))
        for event in accumulator.Tensors(tag)
    ]


@pytest.mark.compat
def test_scalars_histograms_and_probe_order(tmp_path):
    model, x, y = model_and_data()
    callback = ActivationGradientCallback(
        (x[:16], y[:16]), log_dir=str(tmp_path), statistics=["grad_norm", "act_mean"]
    )
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    accumulator = read(tmp_path / "actgrad")
    tags = set(accumulator.Tags()["tensors"])
    for probe in ("p0", "p1"):
        for name in ("grad_norm", "act_mean", "gradient", "activation"):
            assert f"actgrad.{name}/{probe}" in tags
        assert f"actgrad.grad_std/{probe}" not in tags
    assert "actgrad/probe_order" in tags
    order = values(accumulator, "actgrad/probe_order")[-1][1].item()
    assert json.loads(order) == ["p0", "p1"]
    # The last epoch's values equal a fresh computation at the final weights.
    results = keras_actgrad.activation_gradients(model, x[:16], y[:16])
    for probe, result in results.items():
        series = values(accumulator, f"actgrad.grad_norm/{probe}")
        assert [step for step, _ in series] == [0, 1, 2]
        expected = np.sqrt(np.sum(result.gradient.astype(np.float64) ** 2))
        assert float(series[-1][1]) == pytest.approx(expected, rel=1e-5)
        step, buckets = values(accumulator, f"actgrad.gradient/{probe}")[-1]
        assert step == 2 and buckets.shape == (30, 3)
        assert buckets[:, 2].sum() == result.gradient.size
        assert buckets[0, 0] == pytest.approx(result.gradient.min(), rel=1e-5)
        assert buckets[-1, 1] == pytest.approx(result.gradient.max(), rel=1e-5)
        np.testing.assert_allclose(buckets[1:, 0], buckets[:-1, 1])
        plugin = accumulator.SummaryMetadata(f"actgrad.gradient/{probe}")
        assert plugin.plugin_data.plugin_name == "histograms"
        plugin = accumulator.SummaryMetadata(f"actgrad.grad_norm/{probe}")
        assert plugin.plugin_data.plugin_name == "scalars"


@pytest.mark.compat
def test_start_batch_and_weight_prefixes(tmp_path):
    model, x, y = model_and_data()
    callback = ActivationGradientCallback(
        (x, y),
        log_dir=str(tmp_path),
        probe_at_start=True,
        batch_freq=3,
        freq=[1],
        weight_gradients=True,
        histograms=False,
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    accumulator = read(tmp_path / "actgrad")
    tags = set(accumulator.Tags()["tensors"])
    assert [s for s, _ in values(accumulator, "actgrad_start.grad_norm/p0")] == [0]
    # 4 steps an epoch, 8 in all: steps 3 and 6.
    batch_steps = [s for s, _ in values(accumulator, "actgrad_batch.grad_norm/p1")]
    assert batch_steps == [3, 6]
    assert [s for s, _ in values(accumulator, "actgrad.grad_norm/p1")] == [1]
    assert "actgrad_weights.grad_norm/d0/kernel" in tags
    assert "actgrad_weights_start.grad_norm/head/kernel" in tags
    assert "actgrad_weights_batch.grad_norm/d1/bias" in tags
    assert not any(tag.endswith("/gradient") for tag in tags)
    # Same values in TensorBoard as in memory.
    start = [e for e in callback.events if e["kind"] == "start"][0]
    written = float(values(accumulator, "actgrad_start.grad_norm/p0")[0][1])
    assert written == pytest.approx(start["statistics"]["p0"]["grad_norm"], rel=1e-6)
    norm = float(values(accumulator, "actgrad_weights.grad_norm/d0/kernel")[0][1])
    epoch = [e for e in callback.events if e["kind"] == "epoch"][0]
    assert norm == pytest.approx(epoch["weight_grad_norms"]["d0/kernel"], rel=1e-6)


def test_beside_keras_tensorboard(tmp_path):
    model, x, y = model_and_data()
    callback = ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), log_statistics=["grad_norm"]
    )
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[callback, keras.callbacks.TensorBoard(str(tmp_path))],
    )
    assert {"actgrad", "train"} <= set(os.listdir(tmp_path))
    ours = read(tmp_path / "actgrad").Tags()["tensors"]
    keras_tags = read(tmp_path / "train").Tags()["tensors"]
    assert "actgrad.grad_norm/p0" in ours
    assert "epoch_loss" in keras_tags
    # Keras's TensorBoard also logs our `logs` keys, as it does any metric.
    assert "epoch_actgrad/p0/grad_norm" in keras_tags


class _RemoveLogDir(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            shutil.rmtree(self.path)


def test_removed_log_dir_warns_once_and_training_continues(tmp_path):
    model, x, y = model_and_data()
    log_dir = tmp_path / "logs"
    callback = ActivationGradientCallback(
        (x, y), log_dir=str(log_dir), log_statistics=["grad_norm"]
    )
    with our_warnings() as record:
        history = model.fit(
            x,
            y,
            epochs=4,
            verbose=0,
            callbacks=[callback, _RemoveLogDir(str(log_dir))],
        )
    assert len(record) == 1
    assert "could not write TensorBoard" in str(record[0].message)
    assert "no longer exists" in str(record[0].message)
    assert len(history.history["loss"]) == 4
    assert all(np.isfinite(history.history["actgrad/p1/grad_norm"]))
    assert len(callback.events) == 4


class _FullDisk:
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


class _FillDisk(keras.callbacks.Callback):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.target._writer._file.close()
            self.target._writer._file = _FullDisk()  # the record writer


def test_full_disk_warns_once_and_training_continues(tmp_path):
    model, x, y = model_and_data()
    callback = ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), log_statistics=["grad_norm"]
    )
    with our_warnings() as record:
        history = model.fit(
            x, y, epochs=3, verbose=0, callbacks=[callback, _FillDisk(callback)]
        )
    assert len(record) == 1
    assert "No space left" in str(record[0].message)
    assert len(history.history["actgrad/p0/grad_norm"]) == 3
    steps = [s for s, _ in values(read(tmp_path / "actgrad"), "actgrad.grad_norm/p0")]
    assert steps == [0]


@pytest.mark.one_backend("torch", reason="a tensorboard server")
def test_tensorboard_server_lists_our_tags(tmp_path, tensorboard_server):
    model, x, y = model_and_data()
    callback = ActivationGradientCallback((x, y), log_dir=str(tmp_path))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    server = tensorboard_server(tmp_path)
    tags = server.wait_for_json(
        "/data/plugin/scalars/tags",
        lambda tags: "actgrad.grad_norm/p1" in tags.get("actgrad", {}),
        default={},
    )
    assert "actgrad.grad_norm/p0" in tags["actgrad"]
    assert "actgrad.grad_norm/p1" in tags["actgrad"]


def test_pure_python_records_without_tensorflow(tmp_path, monkeypatch):
    import importlib.util

    from keras_actgrad._statistics.statistics import Reduced
    from keras_actgrad._tensorboard import EventWriter

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorflow" else find_spec(name, *args),
    )
    writer = EventWriter(str(tmp_path))
    monkeypatch.undo()
    assert type(writer._file).__name__ == "_Records"  # the pure-Python writer
    reduced = Reduced(
        statistics={"p": {"grad_norm": 2.5}},
        histograms={"p": {"gradient": (-1.0, 3.0, np.array([1, 0, 2, 5]))}},
        weight_grad_norms={"dense/kernel": 0.75},
    )
    assert writer.write("epoch", 4, reduced, ["grad_norm"], ["p"])
    writer.close()
    accumulator = read(tmp_path / "actgrad")
    assert values(accumulator, "actgrad.grad_norm/p") == [(4, pytest.approx(2.5))]
    step, buckets = values(accumulator, "actgrad.gradient/p")[0]
    np.testing.assert_allclose(buckets[:, 2], [1, 0, 2, 5])
    np.testing.assert_allclose(buckets[:, 0], [-1.0, 0.0, 1.0, 2.0])
    np.testing.assert_allclose(buckets[:, 1], [0.0, 1.0, 2.0, 3.0])
    norm = values(accumulator, "actgrad_weights.grad_norm/dense/kernel")[0][1]
    assert float(norm) == pytest.approx(0.75)
