"""Non-finite values anywhere a training step computes them.

`GradientMonitor` checks a monitored step's loss, weight gradients and
weights after the update, and `ActivationGradientCallback` with
`weight_gradients=True` its probe pass's weight gradients and the weights.
The reference is a twin trained by hand (`_monitor_replay._backward`: a
`tf.GradientTape`, or `jax.grad`, on the twin's layers one by one, then the
twin optimizer's `apply`), whose loss, gradients and weights are checked
with NumPy; under `LossScaleOptimizer`, the loss scale the optimizer ends
with (halved once per skipped step).
"""

import math
import warnings

import _monitor_replay
import keras
import numpy as np
import pytest

from keras_actgrad import ActivationGradientCallback, GradientMonitor, GradientProbe

N, D, BATCH = 64, 4, 8
NAN_ROW = 20  # in the third batch: training step 3


def data(nan_row=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    if nan_row is not None:
        x[nan_row] = np.nan
    return x, y


def build(activation="relu", learning_rate=0.1, sqrt=False):
    """Dense -> probe -> Dense (functional: the replay walks its layers)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((D,))
    h = keras.layers.Dense(8, activation=activation, name="a")(inputs)
    if sqrt:
        # h + sqrt(h - h) = h, but its derivative is 1 + Inf * (1 - 1) =
        # NaN: NaN gradients below it at every loss scale, a finite loss.
        h = keras.layers.Lambda(lambda t: t + keras.ops.sqrt(t - t), name="sqrt")(h)
    h = GradientProbe(name="p")(h)
    outputs = keras.layers.Dense(1, name="b")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def backward(twin, x, y):
    """(loss, probe gradients, weight gradients) of one batch, by hand.

    JAX: `_monitor_replay._backward`; PyTorch: `torch.autograd.grad` on the
    twin's layers called one by one. TensorFlow: a tape inside a
    `tf.function`, as Keras runs its step (Grappler's fused Dense + ReLU
    gives relu(NaN) = 0 there, NaN eagerly).
    """
    if keras.backend.backend() == "torch":
        import torch

        h = torch.as_tensor(x)
        watched = []
        for layer in twin.layers[1:]:  # after the InputLayer
            h = layer(h, training=True)
            if isinstance(layer, GradientProbe):
                watched.append(h)
        loss = keras.losses.MeanSquaredError()(torch.as_tensor(y), h)
        variables = [v.value for v in twin.trainable_variables]
        grads = torch.autograd.grad(loss, watched + variables)
        probe_grads = [_numpy(g) for g in grads[: len(watched)]]
        return float(loss.detach()), probe_grads, list(grads[len(watched) :])
    if keras.backend.backend() == "jax":
        _, probe_grads, grads = _monitor_replay._backward(twin, x, y, None)
        prediction = _numpy(twin(x, training=True))
        return np.mean((prediction - y) ** 2), probe_grads, grads
    import tensorflow as tf

    @tf.function
    def compiled(x, y):
        with tf.GradientTape() as tape:
            h = x
            watched = []
            for layer in twin.layers[1:]:  # after the InputLayer
                h = layer(h, training=True)
                if isinstance(layer, GradientProbe):
                    tape.watch(h)
                    watched.append(h)
            loss = keras.losses.MeanSquaredError()(y, h)
        grads = tape.gradient(loss, watched + twin.trainable_variables)
        return loss, grads[: len(watched)], grads[len(watched) :]

    loss, probe_grads, grads = compiled(tf.constant(x), tf.constant(y))
    return float(loss), [_numpy(g) for g in probe_grads], grads


def replay(make, x, y):
    """The first step (1-based) where the hand-trained twin meets a NaN/Inf.

    Returns `(step, found, weights)`: `found` holds `"loss"` (the batch's
    loss, or an earlier one of the epoch, is not finite: `logs["loss"]` is
    their mean), `"probes"`, `"gradients"` and `"weights"` (after the
    update: paths in variable order); `weights` the twin's after that step.
    """
    twin = make()
    paths = [v.path for v in twin.trainable_variables]
    loss_seen = False
    for step in range(1, N // BATCH + 1):
        rows = slice((step - 1) * BATCH, step * BATCH)
        loss, probe_grads, grads = backward(twin, x[rows], y[rows])
        loss_seen |= not np.isfinite(loss)
        twin.optimizer.apply(grads, twin.trainable_variables)
        found = {
            "loss": loss_seen,
            "probes": [g for g in probe_grads if not np.all(np.isfinite(g))],
            "gradients": [
                p
                for p, g in zip(paths, grads, strict=True)
                if not np.all(np.isfinite(_numpy(g)))
            ],
            "weights": [
                v.path
                for v in twin.trainable_variables
                if not np.all(np.isfinite(_numpy(v.value)))
            ],
        }
        if any(found.values()):
            return step, found, twin.get_weights()
    raise AssertionError("the replay met no NaN or Inf")


def fit(model, x, y, callbacks, epochs=1):
    """`fit`; the texts of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    return [str(w.message) for w in caught if "finite" in str(w.message)]


def expected_parts(found):
    """The clauses the alert must hold, from the replay."""
    parts = []
    for key, kind in (("gradients", "the gradient of"), ("weights", "the weights of")):
        names = found[key]
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            parts.append(f"{kind} variable '{names[0]}'{more}")
    return parts


def check_message(message, step, found):
    assert f"at training step {step} " in message, message
    if found["loss"]:
        assert message.startswith("Non-finite loss"), message
    elif found["probes"] or found["gradients"]:
        assert message.startswith("Non-finite gradients"), message
    else:
        assert message.startswith("Non-finite weights"), message
    for part in expected_parts(found):
        assert part in message, (part, message)
    for key, text in (("gradients", "the gradient of"), ("weights", "the weights of")):
        if not found[key]:
            assert text not in message, message
    assert ("the gradient at probe 'p'" in message) == bool(found["probes"]), message


def test_nan_row_raises_at_its_step_and_keeps_that_steps_weights():
    # The run: one NaN row, batch 8, a ReLU MLP with one probe. The
    # probe's gradient may stay finite (TensorFlow: relu(NaN) = 0); the
    # kernel's gradient does not.
    x, y = data(NAN_ROW)
    step, found, weights = replay(build, x, y)
    assert step == NAN_ROW // BATCH + 1
    model = build()
    monitor = GradientMonitor(on_nonfinite="raise")
    with pytest.raises(FloatingPointError) as raised:
        fit(model, x, y, [monitor])
    check_message(str(raised.value), step, found)
    # Raised before the next step: the broken step is recorded, and the
    # model holds the weights it made (those of the twin).
    assert [e["step"] for e in monitor.events] == list(range(1, step + 1))
    assert int(model.optimizer.iterations.numpy()) == step
    for ours, theirs in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        np.testing.assert_allclose(
            ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-5
        )
    # Keras's own train function is back: a later fit records nothing.
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    assert len(monitor.events) == step


def test_nan_row_stops_without_weight_gradients():
    # weight_gradients=False: the checks alone (one reduction a step).
    x, y = data(NAN_ROW)
    step, found, _ = replay(build, x, y)
    model = build()
    monitor = GradientMonitor(weight_gradients=False, on_nonfinite="stop")
    messages = fit(model, x, y, [monitor], epochs=2)
    assert len(messages) == 1
    check_message(messages[0], step, found)
    assert messages[0].endswith("Training stops (on_nonfinite='stop').")
    assert int(model.optimizer.iterations.numpy()) == step
    assert all(e["update_norms"] == {} for e in monitor.events)


def test_inf_learning_rate_alerts_at_the_first_update():
    # The gradients of step 1 are finite; its update is not.
    x, y = data()

    def make():
        return build(learning_rate=math.inf)

    step, found, _ = replay(make, x, y)
    assert step == 1 and not found["gradients"] and not found["loss"]
    assert found["weights"]
    model = make()
    messages = fit(model, x, y, [GradientMonitor()])
    assert len(messages) == 1  # once per run
    check_message(messages[0], step, found)
    assert "after the update at training step 1 " in messages[0]


def test_finite_runs_do_not_alert_and_train_bit_for_bit():
    # weight_gradients=False: the checks are the only new work on the
    # optimizer's side; training is Keras's, bit for bit.
    x, y = data()
    plain = build(activation="tanh")
    fit(plain, x, y, [])
    model = build(activation="tanh")
    monitor = GradientMonitor(weight_gradients=False, on_nonfinite="raise")
    assert fit(model, x, y, [monitor]) == []
    assert len(monitor.events) == N // BATCH
    variables = model.variables + model.optimizer.variables
    references = plain.variables + plain.optimizer.variables
    for ours, theirs in zip(variables, references, strict=True):
        np.testing.assert_array_equal(_numpy(ours.value), _numpy(theirs.value))


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy("float32")


def test_loss_scale_overflow_is_not_an_alert(mixed_float16):
    # Large targets: the first steps' scaled gradients overflow float16;
    # LossScaleOptimizer skips them and halves its scale, as designed.
    x, y = data()
    model = build()
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    initial = float(optimizer.initial_scale)
    monitor = GradientMonitor(on_nonfinite="raise")
    assert fit(model, x, 300.0 * y, [monitor]) == []
    skipped = [e for e in monitor.events if not math.isfinite(e["global_grad_norm"])]
    assert 0 < len(skipped) < len(monitor.events)
    # The optimizer's own record: one halving per skipped step.
    final = float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
    assert final == initial / 2 ** len(skipped)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_loss_scale_does_not_hide_a_nan_loss(mixed_float16):
    # tanh(NaN) is NaN on every backend: the loss of step 3 is NaN.
    x, y = data(NAN_ROW)
    model = build(activation="tanh")
    with pytest.raises(FloatingPointError, match="Non-finite loss") as raised:
        fit(model, x, y, [GradientMonitor(on_nonfinite="raise")])
    assert f"at training step {NAN_ROW // BATCH + 1} " in str(raised.value)


def test_loss_scale_does_not_hide_gradients_nan_at_every_scale(mixed_float16):
    # sqrt at 0: NaN gradients at every loss scale, a finite loss. Every
    # step is skipped; once the scale has halved down to 1 (from 2**15:
    # step 16), the scaling cannot be the cause.
    x, y = data()
    x = np.concatenate([x, x, x])  # 24 steps: training stops at step 16
    y = np.concatenate([y, y, y])
    model = build(sqrt=True)
    initial = float(model.optimizer.initial_scale)
    expected = int(math.log2(initial)) + 1
    monitor = GradientMonitor(on_nonfinite="stop")
    messages = fit(model, x, y, [monitor])
    assert len(messages) == 1
    assert f"at training step {expected} " in messages[0]
    assert "not finite at loss scale 1" in messages[0]
    assert "since step 1)" in messages[0]
    assert len(monitor.events) == expected


def test_callback_weight_gradients():
    # sqrt at 0: the probe's gradient is finite, the first kernel's is not.
    x, y = data()
    model = build(sqrt=True)
    twin = build(sqrt=True)
    _, probe_grads, grads = backward(twin, x, y)
    assert all(np.all(np.isfinite(g)) for g in probe_grads)
    bad = [
        v.path
        for v, g in zip(twin.trainable_variables, grads, strict=True)
        if not np.all(np.isfinite(_numpy(g)))
    ]
    assert bad
    callback = ActivationGradientCallback(
        (x, y),
        weight_gradients=True,
        probe_at_start=True,
        histograms=False,
        on_nonfinite="raise",
    )
    with pytest.raises(FloatingPointError) as raised:
        fit(model, x, y, [callback])
    message = str(raised.value)
    assert message.startswith("Non-finite weight gradients (NaN or Inf) before")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    assert f"the gradient of variable '{bad[0]}'{more} on" in message
    # The weights themselves, once training has made them NaN or Inf.
    model = build(learning_rate=math.inf)
    callback = ActivationGradientCallback(
        (x, y), weight_gradients=True, histograms=False
    )
    messages = fit(model, x, y, [callback])
    broken = [
        v.path for v in model.trainable_variables if not np.all(np.isfinite(v.numpy()))
    ]
    assert len(messages) == 1 and broken
    assert messages[0].startswith("Non-finite weights (NaN or Inf) at epoch 0")
    assert f"variable '{broken[0]}'" in messages[0]


@pytest.mark.parametrize("with_squares", [False, True])
def test_step_checks_flag_each_tensor_as_numpy_does(with_squares):
    # Tensors of repeated and distinct shapes (tested by shape group), a
    # variable without a gradient, NaN and Inf in some, and a finite
    # gradient whose squared norm overflows float32 (not flagged).
    from keras_actgrad._statistics.nonfinite import step_checks

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (3, 4), (), (3, 4), (5,), (2, 0), (7, 2)]
    grads = [rng.normal(size=s).astype("float32") for s in shapes]
    new = [rng.normal(size=s).astype("float32") for s in shapes]
    grads[2][1, 1] = np.nan
    grads[5][0] = np.inf
    grads[7][:] = 1e30  # finite; its sum of squares overflows
    new[0][2, 3] = -np.inf
    new[3] = np.float32(np.nan)
    new[4][0, 0] = np.nan
    grads[1] = None
    expected = np.array(
        [
            [0.0 if g is None else float(not np.all(np.isfinite(g))) for g in grads],
            [float(not np.all(np.isfinite(v))) for v in new],
        ],
        np.float32,
    )
    squares = None
    if with_squares:
        with np.errstate(over="ignore", invalid="ignore"):
            squares = np.array(
                [
                    [np.nan if g is None else np.sum(g**2) for g in grads],
                    [np.sum((v - v) ** 2) for v in new],
                    [np.sum(v**2) for v in new],
                ],
                np.float32,
            )
        squares = keras.ops.convert_to_tensor(squares)
    tensors = [None if g is None else keras.ops.convert_to_tensor(g) for g in grads]
    flags = step_checks(tensors, [keras.ops.convert_to_tensor(v) for v in new], squares)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(flags), expected)
    # All finite: nothing flagged.
    clean = [None] + [
        keras.ops.convert_to_tensor(np.ones(s, "float32")) for s in shapes[1:]
    ]
    flags = step_checks(
        clean, [keras.ops.convert_to_tensor(np.ones(s, "float32")) for s in shapes]
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(flags), np.zeros((2, 8)))
