"""`GradientMonitor` on probes that no gradient reaches (issue #13).

A probe whose output does not reach the loss (a side output the loss does
not use, a branch cut by `stop_gradient`) has an activation but no gradient.
The probe pass reports it so (`activation_gradients`: gradient None; the
probe callback: activation statistics, NaN gradient statistics, an empty
gradient histogram); the monitor reports it the same way. The references
are NumPy statistics of the activation computed independently: a sub-model
`keras.Model(inputs, probe input)` run in training mode on the same batch
with the weights before the step.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_actgrad import GradientMonitor, GradientProbe
from keras_actgrad._statistics.statistics import GRADIENT_STATISTICS, STATISTICS

N, D, BATCH = 64, 8, 16
RNG = np.random.default_rng(3)
X = RNG.normal(size=(N, D)).astype("float32")
Y = (np.arange(N) % 3).astype("int32")
Y_SIDE = np.zeros((N, 1), "float32")
BINS = 7
ACTIVATION_STATISTICS = [s for s in STATISTICS if s not in GRADIENT_STATISTICS]
# The trainable variables of `_models()` no gradient reaches (the side
# output has no loss, the cut branch is behind `stop_gradient`).
NO_GRADIENT = {
    f"{layer}/{name}"
    for layer, names in {
        "side_dense": ("kernel", "bias"),
        "side_bn": ("gamma", "beta"),
        "side_out": ("kernel", "bias"),
        "cut_dense": ("kernel", "bias"),
    }.items()
    for name in names
}


def _models(weights: bool = True) -> tuple[keras.Model, keras.Model]:
    """The model, and a sub-model giving the probes' inputs (shared layers).

    `weights=False`: the unreached branches have no weights (every weight
    then has a gradient); `weights=True`: the weights of `NO_GRADIENT` get
    none.
    """
    keras.utils.set_random_seed(2)
    inputs = keras.Input((D,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="h1")(inputs)
    main_in = h
    h = GradientProbe(name="main")(h)
    # A side output the loss does not use, off the trained trunk.
    if weights:
        s = keras.layers.Dense(6, name="side_dense")(h)
        s = keras.layers.BatchNormalization(name="side_bn")(s)
        side_in = keras.layers.ReLU(name="side_relu")(s)
    else:
        side_in = keras.layers.Activation("tanh", name="side_tanh")(h)
    s = GradientProbe(name="side")(side_in)
    if weights:
        side_out = keras.layers.Dense(1, name="side_out")(s)
    else:
        side_out = keras.layers.Activation("linear", name="side_out")(s)
    # A branch cut by `stop_gradient`, off the input: its weights never
    # get a gradient, so they stay the initial ones.
    if weights:
        cut_in = keras.layers.Dense(5, activation="relu", name="cut_dense")(inputs)
    else:
        cut_in = keras.layers.ReLU(name="cut_relu")(inputs)
    c = keras.ops.stop_gradient(GradientProbe(name="cut")(cut_in))
    merged = keras.layers.Concatenate(name="merged")([h, c])
    logits = keras.layers.Dense(3, name="logits")(merged)
    model = keras.Model(inputs, {"logits": logits, "side_out": side_out})
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
    )
    sub = keras.Model(inputs, {"main": main_in, "side": side_in, "cut": cut_in})
    return model, sub


def _activations(sub: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    out = sub(x, training=True)
    return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in out.items()}


def _reference(a: np.ndarray) -> dict[str, float]:
    """The README's activation statistics, in NumPy (float64)."""
    a = a.astype(np.float64)
    units = a.reshape(-1, a.shape[-1])
    return {
        "act_mean": a.mean(),
        "act_std": a.std(),
        "act_zero_fraction": np.count_nonzero(a == 0) / a.size,
        "dead_unit_fraction": float(np.mean(np.all(units == 0, axis=0))),
    }


def _check_unreached(
    statistics: dict[str, float],
    histograms: dict | None,
    activation: np.ndarray,
    names: list[str],
    where: str,
) -> None:
    expected = _reference(activation)
    for name in names:
        if name in GRADIENT_STATISTICS:
            assert np.isnan(statistics[name]), (where, name)
        else:
            np.testing.assert_allclose(
                statistics[name],
                expected[name],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{where}/{name}",
            )
    if histograms is None:
        return
    low, high, counts = histograms["gradient"]
    assert np.isnan(low) and np.isnan(high) and counts.sum() == 0, where
    low, high, counts = histograms["activation"]
    assert (low, high) == pytest.approx((activation.min(), activation.max()))
    expected_counts, _ = np.histogram(
        activation, bins=len(counts), range=(activation.min(), activation.max())
    )
    # An entry on a bin edge may fall either side in float32.
    assert np.abs(counts - expected_counts).sum() <= 2, where


def _fit(
    model: keras.Model,
    x,
    y_logits,
    y_side,
    monitor,
    epochs=1,
    sample_weight=None,
) -> list[str]:
    """`fit` in order; the texts of the warnings it gave (Adam's about the
    weights without a gradient among them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            {"logits": y_logits, "side_out": y_side},
            sample_weight=sample_weight,
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[] if monitor is None else [monitor],
        )
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "statistics",
    [None, ("grad_norm", "act_mean", "dead_unit_fraction")],
    ids=["all", "some"],
)
@pytest.mark.compat
def test_unreached_probes_report_their_activation(statistics) -> None:
    model, sub = _models()
    names = list(STATISTICS if statistics is None else statistics)
    for step in range(N // BATCH):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        # The weights before the step (`fit` has synced them back).
        activations = _activations(sub, X[batch])
        monitor = GradientMonitor(
            statistics=statistics,
            histograms_every_n_steps=1 if statistics is None else None,
            histogram_bins=BINS,
        )
        _fit(model, X[batch], Y[batch], Y_SIDE[batch], monitor)
        (event,) = monitor.events
        for probe in ("side", "cut"):
            _check_unreached(
                event["statistics"][probe],
                event["histograms"][probe] if statistics is None else None,
                activations[probe],
                names,
                f"step {step}/{probe}",
            )
        # The reached probe: its activation statistics from the same
        # reference, a finite gradient.
        main = event["statistics"]["main"]
        assert np.isfinite(main["grad_norm"]) and main["grad_norm"] > 0
        expected = _reference(activations["main"])
        for name in names:
            if name in expected:
                np.testing.assert_allclose(
                    main[name], expected[name], rtol=1e-5, atol=1e-6
                )


def test_gradient_statistics_only_read_no_activation() -> None:
    # Asked for gradient statistics only: NaN, as before (no activation read).
    model, _ = _models()
    monitor = GradientMonitor(statistics=("grad_norm", "grad_std"))
    _fit(model, X, Y, Y_SIDE, monitor)
    for event in monitor.events:
        for probe in ("side", "cut"):
            assert all(np.isnan(v) for v in event["statistics"][probe].values())
        assert np.isfinite(event["statistics"]["main"]["grad_norm"])


@pytest.mark.xfail(
    keras.backend.backend() == "jax",
    reason="known gap: on JAX a probe whose input depends on no weight is not "
    "differentiated, so the custom_vjp forward rule never hands its activation",
    strict=True,
)
def test_unreached_probes_in_the_spike_record() -> None:
    # The last step has 1000 times the loss: a spike, recorded in full (as
    # tests/test_monitor.py constructs it). The cut branch is a weightless
    # ReLU of the input: the reference is the sub-model's on the batch.
    model, sub = _models(weights=False)
    activations = _activations(sub, X)
    x, y = np.concatenate([X] * 3), np.concatenate([Y] * 3)
    y_side = np.zeros((len(x), 16), "float32")
    sample_weight = np.ones(len(x), "float32")
    sample_weight[-BATCH:] = 1000.0
    monitor = GradientMonitor(spike_factor=5.0, histogram_bins=BINS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the spike warning
        _fit(model, x, y, y_side, monitor, sample_weight=sample_weight)
    spikes = [i for i, e in enumerate(monitor.events) if e["spike"]]
    assert spikes == [len(x) // BATCH - 1]
    event = monitor.events[spikes[0]]
    _check_unreached(
        event["statistics"]["cut"],
        event["histograms"]["cut"],
        activations["cut"][-BATCH:],
        list(STATISTICS),
        "spike/cut",
    )
    side = event["statistics"]["side"]
    assert all(np.isnan(side[s]) for s in GRADIENT_STATISTICS)
    assert all(np.isfinite(side[s]) for s in ACTIVATION_STATISTICS)
    assert np.isfinite(event["statistics"]["main"]["grad_norm"])


def _state(model: keras.Model) -> list[np.ndarray]:
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]


def test_training_is_bit_identical_with_unreached_probes() -> None:
    runs = []
    for monitored in (False, True):
        model, _ = _models()
        monitor = GradientMonitor(
            2, statistics=None, spike_factor=3.0, histograms_every_n_steps=3
        )
        _fit(model, X, Y, Y_SIDE, monitor if monitored else None, epochs=3)
        runs.append(_state(model))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def _reference_weight_gradients(
    twin: keras.Model, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray
) -> dict[str, np.ndarray | None]:
    """d loss / d weights of the compiled loss, by hand (None: no gradient).

    A `tf.GradientTape`, `jax.grad` (zeros where no gradient reaches: JAX
    has no None) or `torch.autograd.grad(allow_unused=True)`, on `twin`
    in training mode; the loss is the compiled one, the sample-weighted
    mean of the logits' cross-entropy.
    """
    backend = keras.backend.backend()
    variables = list(twin.trainable_variables)
    paths = [v.path for v in variables]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_of(logits):
        return loss_fn(y, logits, sample_weight=sample_weight)

    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_of(twin(x, training=True)["logits"])
        grads = tape.gradient(loss, variables)
        values = [None if g is None else g.numpy() for g in grads]
    elif backend == "jax":
        import jax

        def jax_loss(values):
            mapping = list(zip(variables, values, strict=True)) + [
                (v, v.value) for v in twin.non_trainable_variables
            ]
            with keras.StatelessScope(state_mapping=mapping):
                return loss_of(twin(x, training=True)["logits"])

        grads = jax.grad(jax_loss)([v.value for v in variables])
        values = [np.asarray(g) for g in grads]
    else:
        import torch

        loss = loss_of(twin(x, training=True)["logits"])
        grads = torch.autograd.grad(
            loss, [v.value for v in variables], allow_unused=True
        )
        values = [None if g is None else g.detach().numpy() for g in grads]
    return dict(zip(paths, values, strict=True))


def test_global_grad_norm_is_over_the_gradients_that_exist() -> None:
    # Weights no gradient reaches: NaN gradient norm on every backend (JAX
    # differentiates them to zeros, the monitor tells them apart), no
    # update; the global norm is the norm of the gradients that exist.
    model, _ = _models()
    twin, _ = _models()
    paths = [v.path for v in model.trainable_variables]
    assert NO_GRADIENT < set(paths)
    sample_weight = np.linspace(0.5, 2.0, N).astype("float32")
    for step in range(N // BATCH):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        twin.set_weights(model.get_weights())
        before = {
            v.path: np.array(keras.ops.convert_to_numpy(v.value))
            for v in model.trainable_variables
        }
        grads = _reference_weight_gradients(
            twin, X[batch], Y[batch], sample_weight[batch]
        )
        if keras.backend.backend() != "jax":
            assert {p for p, g in grads.items() if g is None} == NO_GRADIENT
        monitor = GradientMonitor()
        _fit(
            model,
            X[batch],
            Y[batch],
            Y_SIDE[batch],
            monitor,
            sample_weight=sample_weight[batch],
        )
        (event,) = monitor.events
        squares = []
        for path in paths:
            got = event["weight_grad_norms"][path]
            if path in NO_GRADIENT:
                assert np.isnan(got), path
                assert event["update_norms"][path] == 0.0, path
                after = keras.ops.convert_to_numpy(
                    model.trainable_variables[paths.index(path)].value
                )
                np.testing.assert_array_equal(after, before[path])
                continue
            g = grads[path].astype(np.float64)
            squares.append(np.sum(g * g))
            np.testing.assert_allclose(got, np.sqrt(squares[-1]), rtol=1e-5)
            assert event["update_norms"][path] > 0, path
        expected = float(np.sqrt(np.sum(squares)))
        assert np.isfinite(event["global_grad_norm"])
        np.testing.assert_allclose(event["global_grad_norm"], expected, rtol=1e-5)


def test_a_spike_is_caught_with_gradient_free_weights() -> None:
    # As tests/test_monitor.py's constructed spike, on a model whose
    # `NO_GRADIENT` weights get no gradient: the running median is armed.
    model, _ = _models()
    x, y = np.concatenate([X] * 3), np.concatenate([Y] * 3)
    y_side = np.zeros((len(x), 1), "float32")
    sample_weight = np.ones(len(x), "float32")
    sample_weight[-BATCH:] = 1000.0  # the last step: 1000 times the loss
    monitor = GradientMonitor(spike_factor=5.0)
    caught = _fit(model, x, y, y_side, monitor, sample_weight=sample_weight)
    steps = len(x) // BATCH
    messages = [text for text in caught if "spike" in text]
    assert [e["step"] for e in monitor.events if e["spike"]] == [steps]
    assert len(messages) == 1 and f"training step {steps}" in messages[0]
    norms = [e["global_grad_norm"] for e in monitor.events]
    assert all(np.isfinite(norms))
    assert norms[-1] > 5.0 * np.median(norms[:-1])
    last = monitor.events[-1]
    assert all(len(v) == len(STATISTICS) for v in last["statistics"].values())
    assert all(np.isnan(last["weight_grad_norms"][p]) for p in NO_GRADIENT)


def test_a_nonfinite_gradient_still_makes_the_global_norm_nonfinite() -> None:
    # A gradient that exists but is not finite (an infinite sample weight
    # in the last batch) is not a missing one: the global norm is not
    # finite, the non-finite alert fires, and the step is no spike.
    model, _ = _models()
    sample_weight = np.ones(N, "float32")
    sample_weight[-1] = np.inf
    # The default statistics (grad_norm): the alert reads the `nonfinite`
    # count the step computes anyway, not only the reported statistics.
    monitor = GradientMonitor(spike_factor=5.0)
    caught = _fit(model, X, Y, Y_SIDE, monitor, sample_weight=sample_weight)
    norms = [e["global_grad_norm"] for e in monitor.events]
    assert all(np.isfinite(norms[:-1])) and not np.isfinite(norms[-1])
    assert not any(e["spike"] for e in monitor.events)
    last = monitor.events[-1]["step"]
    # The infinite loss is named first (the step's loss is checked too).
    alerts = [text for text in caught if "Non-finite" in text]
    assert len(alerts) == 1 and f"at training step {last} " in alerts[0]
    assert alerts[0].startswith("Non-finite loss")
    assert all(
        list(row) == ["grad_norm"] for row in monitor.events[-1]["statistics"].values()
    )
    # on_nonfinite="raise": the same step raises.
    model, _ = _models()
    with pytest.raises(FloatingPointError, match=f"at training step {last} "):
        raising = GradientMonitor(on_nonfinite="raise")
        _fit(model, X, Y, Y_SIDE, raising, sample_weight=sample_weight)
