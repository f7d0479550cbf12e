"""Compile modes users train in on accelerators, on a CPU.

TensorFlow with `jit_compile=True` (XLA: Keras's "auto" on a GPU machine),
`keras.RematScope` (rematerialization), and `steps_per_execution` > 1. The
references are independent of the code under test: a twin trained by hand
(`_monitor_replay.py`), the eager in-place reference
(`inplace_reference.py`), the optimizer's own step counter, and `fit`
without the package (bit for bit).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad._layers import select_layers
from tests import _monitor_replay as replay
from tests.inplace_reference import check, reference

BACKEND = keras.backend.backend()
# The twin trained by hand, once per session (eager, a few seconds).
_replay = functools.cache(replay.replay)
# The replay's last batch weighs 1000 times the others: a spike, warned of.
pytestmark = pytest.mark.filterwarnings("ignore:Gradient spike:UserWarning")


def _recompile(model: keras.Model, **options: object) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"], **options
    )
    return model


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.variables]


def _monitored_against_replay(
    build: object, make_monitor: object = replay.monitor, **options: object
) -> tuple[list[dict[str, object]], keras.Model]:
    """Fits the replay model with `make_monitor()`, checks it by hand.

    `replay.monitor()` computes every statistic, histograms every 3 steps
    and spikes (the last step's loss weighs 1000 times the others').
    """
    spikes = make_monitor is replay.monitor
    runs = []
    for monitored in (False, True):
        model = _recompile(build(), **options)  # type: ignore[operator]
        monitor = make_monitor()  # type: ignore[operator]
        replay.fit(model, [monitor] if monitored else [])
        runs.append((_weights(model), monitor.events, model))
    (plain, _, _), (watched, events, model) = runs
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)  # training unchanged, bit for bit
    reference, reference_weights = _replay()
    assert [e["step"] for e in events] == list(range(1, 9))
    assert [e["step"] for e in events if e["spike"]] == ([8] if spikes else [])
    assert replay.compare(events, reference) < 1e-4
    for a, b in zip(model.get_weights(), reference_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    return events, model


# XLA (TensorFlow's jit_compile).


@pytest.mark.requires_tensorflow(reason="jit_compile=True is XLA on TensorFlow only")
def test_monitor_under_xla_equals_a_replay() -> None:
    # Every statistic, histograms and weight gradients, in an XLA step (no
    # EuclideanNorm, HistogramFixedWidth or dynamic bincount). Spikes under
    # XLA: tests/test_accelerator_defaults.py (each adds seconds of XLA
    # compilation on a CPU).
    events, model = _monitored_against_replay(
        replay.build,
        lambda: keras_actgrad.GradientMonitor(
            statistics=None, histograms_every_n_steps=3
        ),
        jit_compile=True,
    )
    assert model.jit_compile is True
    assert set(events[0]["histograms"]) == {"p1", "p2", "p3"}


def _mse(y_true: object, y_pred: object) -> object:
    y_true = keras.ops.convert_to_tensor(y_true)
    return keras.ops.mean(keras.ops.square(keras.ops.subtract(y_pred, y_true)))


def _in_place_against_reference(
    model: keras.Model, twin: keras.Model | None = None
) -> None:
    """`activation_gradients(layers=)` and the callback's probe pass.

    The reference is computed on `twin` (same weights), if given.
    """
    x, y = replay.X[:16], replay.Y[:16]
    layers = ["d1", "d2"]
    twin = model if twin is None else twin
    sites = {s.name: s.layer for s in select_layers(twin, layers)}
    expected = reference(twin, x, y, _mse, sites)
    results = keras_actgrad.activation_gradients(model, x, y, layers=layers)
    check(results, expected)
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), layers=layers, statistics=None, probe_at_start=True
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    start = callback.events[0]
    assert start["kind"] == "start"
    for name, (activation, gradient) in expected.items():
        values = start["statistics"][name]
        assert values["grad_norm"] == pytest.approx(np.linalg.norm(gradient), rel=1e-5)
        assert values["act_mean"] == pytest.approx(activation.mean(), rel=1e-5)
        low, high, counts = start["histograms"][name]["gradient"]
        assert counts.sum() == gradient.size
        np.testing.assert_allclose([low, high], [gradient.min(), gradient.max()])


@pytest.mark.requires_tensorflow(reason="jit_compile=True is XLA on TensorFlow only")
def test_in_place_and_callback_on_an_xla_model() -> None:
    # The probe pass of a jit-compiled model is compiled with XLA too.
    model = _recompile(keras_actgrad.strip_probes(replay.build()), jit_compile=True)
    _in_place_against_reference(model)


# Rematerialization (`keras.RematScope`). Keras 3.15.1's own remat fails on
# TensorFlow in graph mode (`tf.custom_gradient` with keyword arguments),
# with or without this package.
REMAT_BACKENDS = pytest.mark.skipif(
    BACKEND == "tensorflow",
    reason="Keras 3.15.1's RematScope fails on TensorFlow's fit itself",
)


def test_keras_remat_attribute() -> None:
    # `remat_outside_taps` reads Keras 3.15.1's private `_remat_mode`.
    with keras.RematScope(mode="full"):
        layer = keras.layers.Dense(2)
    assert layer._remat_mode is not None and layer._remat_mode.mode == "full"
    assert keras.layers.Dense(2)._remat_mode is None


# The monitor under remat against the replay, bit for bit, with every
# statistic, histograms and spikes: tests/test_accelerator_defaults.py (JAX).


@REMAT_BACKENDS
def test_in_place_and_callback_under_remat() -> None:
    with keras.RematScope(mode="full"):
        model = keras_actgrad.strip_probes(replay.build())
    # The reference on a twin without remat (the same weights).
    twin = keras_actgrad.strip_probes(replay.build())
    _in_place_against_reference(_recompile(model), twin)
    # The layers measured in place and the model keep their remat mode.
    assert model.get_layer("d1")._remat_mode is not None
    assert model._remat_mode is not None


@REMAT_BACKENDS
def test_monitor_in_place_under_remat() -> None:
    with keras.RematScope(mode="full"):
        model = keras_actgrad.strip_probes(replay.build())
    _recompile(model)
    twin = _recompile(keras_actgrad.strip_probes(replay.build()))
    monitors = [keras_actgrad.GradientMonitor(layers=["d1", "d2", "d3"]) for _ in "ab"]
    replay.fit(model, [monitors[0]])
    replay.fit(twin, [monitors[1]])
    for a, b in zip(monitors[0].events, monitors[1].events, strict=True):
        for site, values in b["statistics"].items():
            assert a["statistics"][site]["grad_norm"] == pytest.approx(
                values["grad_norm"], rel=1e-5
            )
        assert a["global_grad_norm"] == pytest.approx(b["global_grad_norm"], rel=1e-5)


# `steps_per_execution` > 1 (PyTorch: Keras itself refuses it).
EXECUTION_BACKENDS = pytest.mark.skipif(
    BACKEND == "torch", reason="Keras 3.15.1 refuses steps_per_execution > 1 on torch"
)


@EXECUTION_BACKENDS
def test_monitor_with_steps_per_execution_equals_a_replay() -> None:
    # 8 steps in executions of 3, 3 and 2: every step at its own global
    # step, histograms every 3 steps, the spike at the last.
    events, _ = _monitored_against_replay(replay.build, steps_per_execution=3)
    assert [e["step"] for e in events if e["histograms"] and not e["spike"]] == [
        1,
        4,
        7,
    ]


@EXECUTION_BACKENDS
@pytest.mark.parametrize("every", [3, 5])
def test_monitor_schedule_inside_executions(every: int) -> None:
    # 8 steps an epoch in executions of 3, 3, 2; every 5 steps, some
    # executions hold no monitored step and run Keras's own function.
    runs = {}
    for steps in (1, 3):
        model = _recompile(replay.build(), steps_per_execution=steps)
        monitor = keras_actgrad.GradientMonitor(every)
        model.fit(
            replay.X,
            replay.Y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[monitor],
        )
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 16
        runs[steps] = monitor.events
    assert [e["step"] for e in runs[3]] == list(range(1, 17, every))
    for a, b in zip(runs[1], runs[3], strict=True):
        assert a["global_grad_norm"] == pytest.approx(b["global_grad_norm"], rel=1e-6)


class _Steps(keras.callbacks.Callback):
    """The batch arguments Keras passes, and the optimizer's step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.begin: list[int] = []
        self.end: list[int] = []
        self.iterations: list[int] = []

    def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
        self.begin.append(batch)

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.end.append(batch)
        value = self.model.optimizer.iterations
        self.iterations.append(int(keras.ops.convert_to_numpy(value)))


@EXECUTION_BACKENDS
def test_keras_batch_hooks_with_steps_per_execution() -> None:
    # The callback's `batch_freq` reads `on_train_batch_end(batch)` as the
    # last step of the execution (Keras 3.11 and later; 3.10 passed the
    # first), past the epoch's end for its last execution.
    model = _recompile(replay.build(), steps_per_execution=3)
    steps = _Steps()
    model.fit(replay.X, replay.Y, batch_size=16, epochs=1, verbose=0, callbacks=[steps])
    assert steps.begin == [0, 3, 6]
    assert steps.end == [2, 5, 8]
    assert steps.iterations == [3, 6, 8]


@EXECUTION_BACKENDS
def test_callback_batch_freq_counts_steps_run() -> None:
    model = _recompile(replay.build(), steps_per_execution=3)
    callback = keras_actgrad.ActivationGradientCallback(
        (replay.X[:16], replay.Y[:16]), batch_freq=2, freq=100, histograms=False
    )
    steps = _Steps()
    model.fit(
        replay.X,
        replay.Y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[callback, steps],
    )
    batches = [e["step"] for e in callback.events if e["kind"] == "batch"]
    # Every execution that crosses a multiple of 2, at the step it ends on.
    assert steps.iterations == [3, 6, 8, 11, 14, 16]
    assert batches == steps.iterations


class _RematBlock(keras.layers.Layer):
    """A block whose call rematerializes a function holding a probe."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8, activation="tanh")
        self.probe = keras_actgrad.GradientProbe(name="inner")

    def call(self, x: object) -> object:
        return keras.remat(lambda h: self.probe(self.dense(h)))(x)


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX checkpoint's tracers")
def test_a_probe_inside_keras_remat_is_a_clear_error() -> None:
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(_RematBlock(name="block")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    with pytest.raises(ValueError, match=r"keras\.remat.*Received") as error:
        keras_actgrad.activation_gradients(model, x, y)
    assert "layers=[...]" in str(error.value)
    # The alternative the error names works: the block measured in place.
    sites = {s.name: s.layer for s in select_layers(model, ["block"])}
    check(
        keras_actgrad.activation_gradients(model, x, y, layers=["block"]),
        reference(model, x, y, _mse, sites),
    )
