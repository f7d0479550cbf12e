"""Mixed precision: probe gradients match a float32 copy of the model.

References are hand-split `tf.GradientTape` passes over the float32 copy (same
weights); the float16 failure mode that loss scaling prevents is shown with
the same hand-split tape on the float16 model.
"""

import keras
import numpy as np
import pytest

import keras_actgrad

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="loss scaling of the probe pass is tested on the TensorFlow adapter",
)

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

# Relative tolerances: float16 has a 10-bit mantissa, bfloat16 a 7-bit one;
# a few rounded operations separate the two passes.
TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 6e-2}


@pytest.fixture
def global_policy():
    """Sets the global dtype policy for the test, then restores float32."""

    def set_policy(name):
        keras.config.set_dtype_policy(name)

    yield set_policy
    keras.config.set_dtype_policy("float32")


def build(loss="mse"):
    """Dense -> probe -> Dense -> probe -> Dense, under the current policy."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", name="d1")(inputs)
    h = keras_actgrad.GradientProbe(name="hidden")(h)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    h = keras_actgrad.GradientProbe(name="features")(h)
    outputs = keras.layers.Dense(3, name="d3")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=loss)
    return model


def hand_split(model, x, y, loss_fn):
    """d loss / d (d1 output) and d loss / d (d2 output), by a split tape."""
    d1, d2, d3 = (model.get_layer(n) for n in ("d1", "d2", "d3"))
    with tf.GradientTape() as tape:
        h1 = d1(x)
        tape.watch(h1)
        h2 = d2(h1)
        tape.watch(h2)
        out = d3(h2)
        # Keras reduces per-example losses by their mean over the batch.
        loss = tf.reduce_mean(tf.cast(loss_fn(y, out), tf.float32))
    g1, g2 = tape.gradient(loss, [h1, h2])
    return {"hidden": g1.numpy(), "features": g2.numpy()}


def float32_copy(model, loss="mse"):
    keras.config.set_dtype_policy("float32")
    copy = build(loss)
    copy.set_weights(model.get_weights())
    return copy


def data(scale=1.0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (scale * rng.normal(size=(32, 3))).astype("float32")
    return x, y


def close(actual, expected, rtol):
    """Max abs difference within `rtol` of the reference's largest entry."""
    return np.max(np.abs(actual - expected)) <= rtol * np.max(np.abs(expected))


@pytest.mark.compat
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_gradients_match_float32_copy(global_policy, policy):
    global_policy(policy)
    keras.utils.set_random_seed(1)
    model = build()
    x, y = data()
    results = keras_actgrad.activation_gradients(model, x, y)
    reference = hand_split(float32_copy(model), x, y, keras.losses.mean_squared_error)
    half = "float16" if policy == "mixed_float16" else "bfloat16"
    for name in ("hidden", "features"):
        # The activation is the probe's own (half-precision) output; the
        # gradient comes back in float32.
        assert str(results[name].activation.dtype) == half
        assert results[name].gradient.dtype == np.float32
        assert np.abs(reference[name]).max() > 0
        assert close(results[name].gradient, reference[name], TOLERANCE[policy])


def test_small_loss_does_not_underflow_in_float16(global_policy):
    global_policy("mixed_float16")
    keras.utils.set_random_seed(2)

    def tiny_loss(y_true, y_pred):
        # A loss this small has per-element gradients below float16's
        # smallest subnormal (6e-8) at every layer.
        return 1e-6 * keras.losses.mean_squared_error(y_true, y_pred)

    model = build(loss=tiny_loss)
    x, y = data(scale=0.01)

    # The failure mode: an unscaled float16 backward pass gives all zeros.
    unscaled = hand_split(model, x, y, tiny_loss)
    for name in ("hidden", "features"):
        assert unscaled[name].dtype == np.float16
        assert np.all(unscaled[name] == 0)

    reference = hand_split(float32_copy(model, loss=tiny_loss), x, y, tiny_loss)
    results = keras_actgrad.activation_gradients(model, x, y)
    for name in ("hidden", "features"):
        assert np.abs(reference[name]).max() > 0
        assert np.count_nonzero(results[name].gradient) == reference[name].size
        assert close(results[name].gradient, reference[name], 1e-2)


def test_optimizer_loss_scale_is_used_and_left_unchanged(global_policy):
    global_policy("mixed_float16")
    keras.utils.set_random_seed(3)
    model = build()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    model.train_on_batch(x, y)  # builds the optimizer and its dynamic scale
    from keras_actgrad._backends.base import loss_scale

    model.optimizer.dynamic_scale.assign(1024.0)
    assert loss_scale(model) == 1024.0
    results = keras_actgrad.activation_gradients(model, x, y)
    assert float(model.optimizer.dynamic_scale.numpy()) == 1024.0
    reference = hand_split(float32_copy(model), x, y, keras.losses.mean_squared_error)
    assert close(results["hidden"].gradient, reference["hidden"], 1e-2)


def test_overflowing_scale_falls_back_to_finite_gradients(global_policy):
    global_policy("mixed_float16")
    keras.utils.set_random_seed(4)
    model = build()
    x, y = data(scale=100.0)  # large errors: gradients of order 10
    model.train_on_batch(x, y)
    # 2**30 times a gradient of order 10 overflows float16 (max 65504).
    model.optimizer.dynamic_scale.assign(2.0**30)
    overflow = hand_split(
        model, x, y, lambda t, p: 2.0**30 * keras.losses.mean_squared_error(t, p)
    )
    assert not np.all(np.isfinite(overflow["hidden"]))
    results = keras_actgrad.activation_gradients(model, x, y)
    reference = hand_split(float32_copy(model), x, y, keras.losses.mean_squared_error)
    for name in ("hidden", "features"):
        assert np.all(np.isfinite(results[name].gradient))
        assert close(results[name].gradient, reference[name], 1e-2)


def test_float32_model_gradients_are_not_scaled():
    keras.utils.set_random_seed(5)
    model = build()
    x, y = data()
    results = keras_actgrad.activation_gradients(model, x, y)
    reference = hand_split(model, x, y, keras.losses.mean_squared_error)
    for name in ("hidden", "features"):
        np.testing.assert_allclose(
            results[name].gradient, reference[name], rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_callback_statistics_match_float32_copy(global_policy, policy):
    global_policy(policy)
    keras.utils.set_random_seed(6)

    def tiny_loss(y_true, y_pred):
        # Small enough to underflow in an unscaled float16 backward pass.
        return 1e-6 * keras.losses.mean_squared_error(y_true, y_pred)

    model = build(loss=tiny_loss)
    x, y = data(scale=0.01)
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y),
        statistics=["grad_norm", "grad_max_abs", "act_mean", "nonfinite"],
        log_statistics=["grad_norm", "grad_max_abs", "act_mean"],
        histograms=False,
    )
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    copy = float32_copy(model, loss=tiny_loss)
    reference = hand_split(copy, x, y, tiny_loss)
    d1 = copy.get_layer("d1")(x).numpy().astype(np.float64)
    rtol = TOLERANCE[policy]
    for name in ("hidden", "features"):
        gradient = reference[name].astype(np.float64)
        norm = np.sqrt(np.sum(gradient**2))
        logged = history.history[f"actgrad/{name}/grad_norm"][-1]
        assert norm > 0
        assert logged == pytest.approx(norm, rel=rtol)
        assert history.history[f"actgrad/{name}/grad_max_abs"][-1] == pytest.approx(
            np.abs(gradient).max(), rel=rtol
        )
        assert callback.events[-1]["statistics"][name]["nonfinite"] == 0
    # Statistics are reduced in float32: the mean of a half-precision
    # activation matches the float32 copy's to half precision, not worse.
    assert history.history["actgrad/hidden/act_mean"][-1] == pytest.approx(
        d1.mean(), rel=rtol, abs=rtol * np.abs(d1).mean()
    )


def test_truly_nonfinite_float16_gradients_are_reported(global_policy):
    # An activation that overflows float16 (max 65504) makes the gradient
    # non-finite at every scale: the fallback must end (at scale 1) and the
    # callback must follow on_nonfinite.
    global_policy("mixed_float16")
    keras.utils.set_random_seed(7)
    model = build()
    x, y = data()
    x_big = 1e5 * x  # d1's pre-activation overflows to +-inf in float16
    results = keras_actgrad.activation_gradients(model, x_big, y)
    assert not np.all(np.isfinite(results["hidden"].gradient))
    callback = keras_actgrad.ActivationGradientCallback(
        (x_big, y), on_nonfinite="raise", histograms=False
    )
    keras.utils.set_random_seed(8)
    with pytest.raises(FloatingPointError, match="Non-finite gradients"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    # Raised at the end of the epoch: the epoch's training is kept, exactly
    # as a twin trained without the callback has it.
    keras.utils.set_random_seed(7)
    twin = build()
    keras.utils.set_random_seed(8)
    twin.fit(x, y, epochs=1, verbose=0)
    for ours, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.compat
def test_weight_gradient_norms_are_unscaled(global_policy):
    # Weight gradients share the scaled backward pass: they must come back
    # unscaled, matching the float32 copy's.
    global_policy("mixed_float16")
    keras.utils.set_random_seed(9)

    def tiny_loss(y_true, y_pred):
        return 1e-6 * keras.losses.mean_squared_error(y_true, y_pred)

    model = build(loss=tiny_loss)
    x, y = data(scale=0.01)
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), weight_gradients=True, probe_at_start=True, histograms=False
    )
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    start = callback.events[0]
    assert start["kind"] == "start"
    # The reference: the float32 copy with the weights before training.
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(9)
    initial = build(loss=tiny_loss)
    copy = float32_copy(initial, loss=tiny_loss)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tiny_loss(y, copy(x)))
    grads = tape.gradient(loss, copy.trainable_variables)
    for variable, grad in zip(copy.trainable_variables, grads, strict=True):
        norm = float(np.sqrt(np.sum(grad.numpy().astype(np.float64) ** 2)))
        assert norm > 0
        logged = start["weight_grad_norms"][variable.path]
        assert logged == pytest.approx(norm, rel=1e-2), variable.path
