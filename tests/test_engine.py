"""Tests for `activation_gradients` and the probe engine (TensorFlow backend).

Every gradient is checked against references that do not use the code under
test: a hand-split `tf.GradientTape` (the model's layers called by hand, the
tape watching the tensor at the probe), central finite differences in
float64 on the same hand-split tail, or a closed form. Losses in the
references are written by hand, not taken from `model.compute_loss`.
"""

import copy
import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_actgrad import GradientProbe, activation_gradients, insert_probes
from keras_actgrad._engine import get_engine

# The references are TensorFlow tapes; the JAX and PyTorch engines are checked
# against the TensorFlow one in test_backends.py.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="references use tf.GradientTape (other backends: test_backends.py)",
)

# --- helpers ------------------------------------------------------------------


@pytest.fixture
def float64():
    """Builds models in float64, so finite differences are accurate."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def tape_gradient(tail, h):
    """d tail(h) / d h with a tape; reference forwards change no state."""
    h = tf.constant(np.asarray(h))  # a new tensor, even if `h` is one
    with keras.StatelessScope():
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = tail(h)
    return tape.gradient(loss, h).numpy()


def finite_differences(tail, h, gradient, count=6, eps=1e-6, seed=0):
    """Checks `gradient` on `count` coordinates by central differences."""
    h = np.asarray(h, dtype="float64")
    rng = np.random.default_rng(seed)
    indices = rng.choice(h.size, size=min(count, h.size), replace=False)
    estimates = []
    for index in indices:
        plus, minus = h.copy(), h.copy()
        plus.flat[index] += eps
        minus.flat[index] -= eps
        # One scope per forward: state a forward advances (seeds) is dropped.
        with keras.StatelessScope():
            up = float(tail(tf.constant(plus)))
        with keras.StatelessScope():
            down = float(tail(tf.constant(minus)))
        estimates.append((up - down) / (2 * eps))
    np.testing.assert_allclose(
        np.asarray(gradient).flat[indices], estimates, rtol=1e-5, atol=1e-8
    )


def check_probe(result, head, tail, training=False):
    """Activation == head(x); gradient == tape and finite differences."""
    with keras.StatelessScope():
        activation = np.asarray(head())
    np.testing.assert_allclose(result.activation, activation, rtol=1e-12, atol=1e-12)
    reference = tape_gradient(tail, activation)
    np.testing.assert_allclose(result.gradient, reference, rtol=1e-10, atol=1e-12)
    finite_differences(tail, activation, result.gradient)
    assert np.abs(reference).max() > 0  # the check is not vacuous


def mse(y, y_pred):
    return tf.reduce_mean(tf.square(tf.cast(y_pred, y.dtype) - y))


def sparse_ce(labels, logits):
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    )


def rng_normal(shape, seed=0, dtype="float32"):
    values = np.random.default_rng(seed).normal(size=shape)
    # Values exact in float32, whatever the model's dtype.
    return values.astype("float32").astype(dtype)


# --- the three examples of the question that started the project ------------


def test_seed_example_1_gradient_with_respect_to_the_input():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            GradientProbe(name="input_probe"),
            keras.layers.Dense(10, activation="relu"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = rng_normal((4, 5)), rng_normal((4, 10), seed=1)
    got = activation_gradients(model, x, y)["input_probe"]

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = mse(y, model(inputs))
    np.testing.assert_allclose(got.activation, x)
    np.testing.assert_allclose(got.gradient, tape.gradient(loss, inputs), rtol=1e-5)

    # The question's pseudo-loss is `loss="sum"`; it is a different gradient.
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        pseudo = tf.reduce_sum(model(inputs))
    pseudo_gradient = tape.gradient(pseudo, inputs).numpy()
    summed = activation_gradients(model, x, loss="sum")["input_probe"]
    np.testing.assert_allclose(summed.gradient, pseudo_gradient, rtol=1e-5)
    assert not np.allclose(got.gradient, pseudo_gradient)


def test_seed_example_2_gradient_at_an_intermediate_dense_output():
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            GradientProbe(name="layer2_probe"),
            keras.layers.Dense(5),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = rng_normal((4, 10)), rng_normal((4, 5), seed=1)
    got = activation_gradients(model, x, y)["layer2_probe"]

    dense1, dense2, _, dense3 = model.layers
    with tf.GradientTape() as tape:
        layer2_output = dense2(dense1(tf.constant(x)))
        tape.watch(layer2_output)
        loss = mse(y, dense3(layer2_output))
    np.testing.assert_allclose(got.activation, layer2_output, rtol=1e-6)
    np.testing.assert_allclose(
        got.gradient, tape.gradient(loss, layer2_output), rtol=1e-5, atol=1e-8
    )
    # The question's `reduce_sum(layer2_output)` would give all ones.
    assert not np.allclose(got.gradient, 1.0)


class Square(keras.layers.Layer):
    """The question's custom activation layer."""

    def call(self, inputs):
        return keras.ops.square(inputs)


def test_seed_example_3_gradient_at_a_custom_squaring_layer():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16),
            Square(),
            GradientProbe(name="square_probe"),
            keras.layers.Dense(5),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = rng_normal((4, 5)), rng_normal((4, 5), seed=1)
    got = activation_gradients(model, x, y)["square_probe"]

    dense1, square, _, dense2 = model.layers
    with tf.GradientTape() as tape:
        squared = square(dense1(tf.constant(x)))
        tape.watch(squared)
        loss = mse(y, dense2(squared))
    np.testing.assert_allclose(got.activation, squared, rtol=1e-6)
    np.testing.assert_allclose(
        got.gradient, tape.gradient(loss, squared), rtol=1e-5, atol=1e-8
    )
    # Closed form: Dense(5) after the probe, MSE: dL/dh = 2/(n k) (h W + b - y) W^T.
    kernel, bias = dense2.kernel.numpy(), dense2.bias.numpy()
    closed = 2.0 / y.size * (got.activation @ kernel + bias - y) @ kernel.T
    np.testing.assert_allclose(got.gradient, closed, rtol=1e-4, atol=1e-7)


# --- agreement on a zoo of models (float64: tape and finite differences) ------


def _mlp_with_batchnorm_and_dropout():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="d1"),
            GradientProbe(name="pre_bn"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("relu", name="relu"),
            GradientProbe(name="post_bn"),
            keras.layers.Dropout(0.5, name="drop"),
            GradientProbe(name="post_drop"),
            keras.layers.Dense(6, activation="tanh", name="d2"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Non-trivial moving statistics.
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 8))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8))
    return model


def test_sequential_mlp_with_batchnorm_and_dropout_inference(float64):
    model = _mlp_with_batchnorm_and_dropout()
    x, labels = rng_normal((16, 4), dtype="float64"), np.arange(16) % 3
    results = activation_gradients(model, x, labels)
    assert list(results) == ["pre_bn", "post_bn", "post_drop"]
    d1, bn, relu, drop, d2, logits = (
        model.get_layer(n) for n in ["d1", "bn", "relu", "drop", "d2", "logits"]
    )

    def after_drop(h):
        return sparse_ce(labels, logits(d2(h)))

    def after_bn(h):
        return after_drop(drop(h, training=False))

    def after_d1(h):
        return after_bn(relu(bn(h, training=False)))

    check_probe(results["pre_bn"], lambda: d1(x), after_d1)
    check_probe(results["post_bn"], lambda: relu(bn(d1(x), training=False)), after_bn)
    # Dropout is off: the gradient passes through it unchanged.
    np.testing.assert_array_equal(
        results["post_bn"].gradient, results["post_drop"].gradient
    )


def test_sequential_mlp_with_batchnorm_and_dropout_training(float64):
    model = _mlp_with_batchnorm_and_dropout()
    x, labels = rng_normal((16, 4), dtype="float64"), np.arange(16) % 3
    results = activation_gradients(model, x, labels, training=True)
    d1, bn, relu, drop, d2, logits = (
        model.get_layer(n) for n in ["d1", "bn", "relu", "drop", "d2", "logits"]
    )

    # BatchNorm on batch statistics couples the examples: the reference
    # differentiates through the batch mean and variance.
    def after_d1(h):
        return after_drop(drop(relu(bn(h, training=True)), training=True))

    def after_drop(h):
        return sparse_ce(labels, logits(d2(h)))

    # The probe pass leaves the seed generator untouched, so a reference
    # forward from the same seed state draws the same dropout mask.
    check_probe(results["pre_bn"], lambda: d1(x), after_d1)
    check_probe(
        results["post_drop"],
        lambda: drop(relu(bn(d1(x), training=True)), training=True),
        after_drop,
    )
    # Structural check, independent of the seed: dropped units get exactly
    # zero gradient, kept units the downstream gradient scaled by 1/(1-rate).
    before, after = results["post_bn"], results["post_drop"]
    dropped = (after.activation == 0) & (before.activation != 0)
    kept = after.activation != 0
    assert 0.2 < dropped.sum() / (before.activation != 0).sum() < 0.8
    np.testing.assert_array_equal(before.gradient[dropped], 0.0)
    np.testing.assert_allclose(
        before.gradient[kept], after.gradient[kept] * 2.0, rtol=1e-12
    )
    np.testing.assert_allclose(
        after.activation[kept], before.activation[kept] * 2.0, rtol=1e-12
    )
    # BatchNorm in training mode differs from inference.
    inference = activation_gradients(model, x, labels)
    assert not np.allclose(inference["pre_bn"].gradient, results["pre_bn"].gradient)


def _cnn(probe_on_skip):
    keras.utils.set_random_seed(5)
    conv1 = keras.layers.Conv2D(3, 3, padding="same", name="conv1")
    conv2 = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv2")
    inputs = keras.Input((5, 5, 2))
    c1 = conv1(inputs)
    probed = GradientProbe(name="conv1_probe")(c1)
    residual = conv2(probed)
    # The skip reads either the probe's output or conv1's output directly.
    skip = probed if probe_on_skip else c1
    added = GradientProbe(name="add_probe")(keras.layers.Add()([skip, residual]))
    pooled = keras.layers.GlobalAveragePooling2D()(added)
    outputs = keras.layers.Dense(2, name="head")(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    return model, conv1, conv2


@pytest.mark.parametrize("probe_on_skip", [True, False])
def test_functional_cnn_with_residual_add(float64, probe_on_skip):
    model, conv1, conv2 = _cnn(probe_on_skip)
    x = rng_normal((3, 5, 5, 2), dtype="float64")
    y = rng_normal((3, 2), seed=1, dtype="float64")
    results = activation_gradients(model, x, y)
    assert list(results) == ["conv1_probe", "add_probe"]
    pool = model.layers[-2]
    head = model.get_layer("head")
    with keras.StatelessScope():
        c1 = conv1(x)

    def after_add(h):
        return mse(y, head(pool(h)))

    def after_conv1(h):
        # A skip that bypasses the probe is a constant for the probe.
        skip = h if probe_on_skip else c1
        return after_add(skip + conv2(h))

    check_probe(results["conv1_probe"], lambda: conv1(x), after_conv1)
    check_probe(results["add_probe"], lambda: c1 + conv2(c1), after_add)
    # The skip's share of the gradient is d loss / d (add output).
    through_conv2 = tape_gradient(lambda h: after_add(c1 + conv2(h)), c1)
    difference = results["conv1_probe"].gradient - through_conv2
    expected = results["add_probe"].gradient if probe_on_skip else 0.0
    np.testing.assert_allclose(difference, expected, atol=1e-12)


def _multi_io(probe_b_branch=True):
    keras.utils.set_random_seed(6)
    image = keras.Input((4,), name="image")
    meta = keras.Input((2,), name="meta")
    trunk = keras.layers.Dense(5, activation="tanh", name="trunk")(image)
    trunk = GradientProbe(name="trunk_probe")(trunk)
    h = keras.layers.Concatenate(name="concat")([trunk, meta])
    a = keras.layers.Dense(1, name="a")(h)
    b_hidden = keras.layers.Dense(4, activation="tanh", name="b_hidden")(h)
    if probe_b_branch:
        b_hidden = GradientProbe(name="b_probe")(b_hidden)
    b = keras.layers.Dense(3, activation="softmax", name="b")(b_hidden)
    return keras.Model({"image": image, "meta": meta}, {"a": a, "b": b})


def _multi_io_data(n=8, dtype="float64"):
    x = {"image": rng_normal((n, 4), 0, dtype), "meta": rng_normal((n, 2), 1, dtype)}
    onehot = np.eye(3, dtype=dtype)[np.arange(n) % 3]
    return x, {"a": rng_normal((n, 1), 2, dtype), "b": onehot}


def test_multi_input_multi_output_dict_inputs_and_loss_weights(float64):
    model = _multi_io()
    model.compile(
        optimizer="sgd",
        loss={"a": "mse", "b": "categorical_crossentropy"},
        loss_weights={"a": 2.0, "b": 0.5},
    )
    x, y = _multi_io_data()
    results = activation_gradients(model, x, y)
    assert list(results) == ["trunk_probe", "b_probe"]
    trunk, concat, a, b_hidden, b = (
        model.get_layer(n) for n in ["trunk", "concat", "a", "b_hidden", "b"]
    )

    def total(out_a, out_b):
        crossentropy = -tf.reduce_mean(tf.reduce_sum(y["b"] * tf.math.log(out_b), -1))
        return 2.0 * mse(y["a"], out_a) + 0.5 * crossentropy

    with keras.StatelessScope():
        h = concat([trunk(x["image"]), x["meta"]])

    def after_trunk(t):
        h = concat([t, x["meta"]])
        return total(a(h), b(b_hidden(h)))

    check_probe(results["trunk_probe"], lambda: trunk(x["image"]), after_trunk)
    check_probe(results["b_probe"], lambda: b_hidden(h), lambda t: total(a(h), b(t)))


def test_probe_on_a_branch_without_loss_has_no_gradient():
    model = _multi_io()
    model.compile(optimizer="sgd", loss={"a": "mse", "b": None})
    x, y = _multi_io_data(dtype="float32")
    results = activation_gradients(model, x, {"a": y["a"]})
    assert results["b_probe"].gradient is None
    assert results["b_probe"].activation.shape == (8, 4)
    assert results["trunk_probe"].gradient is not None
    assert np.abs(results["trunk_probe"].gradient).max() > 0


def test_embedding_and_lstm(float64):
    keras.utils.set_random_seed(7)
    tokens = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(12, 4, mask_zero=True)
    lstm = keras.layers.LSTM(3)
    head = keras.layers.Dense(1)
    h = GradientProbe(name="embedding_probe")(embedding(tokens))
    h = GradientProbe(name="lstm_probe")(lstm(h))
    model = keras.Model(tokens, head(h))
    model.compile(optimizer="sgd", loss="mse")
    x = np.array([[3, 5, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]], "int32")
    y = rng_normal((3, 1), dtype="float64")
    results = activation_gradients(model, x, y)
    mask = x != 0

    def after_embedding(e):
        return mse(y, head(lstm(e, mask=tf.constant(mask))))

    check_probe(results["embedding_probe"], lambda: embedding(x), after_embedding)
    check_probe(
        results["lstm_probe"],
        lambda: lstm(embedding(x), mask=tf.constant(mask)),
        lambda s: mse(y, head(s)),
    )
    # The mask reached the LSTM: padded steps get exactly zero gradient.
    gradient = results["embedding_probe"].gradient
    np.testing.assert_array_equal(gradient[~mask], 0.0)
    assert (np.abs(gradient[mask]).sum(-1) > 0).all()


def test_probe_on_integer_tokens_warns_and_has_no_gradient():
    tokens = keras.Input((3,), dtype="int32")
    h = GradientProbe(name="token_probe")(tokens)
    h = keras.layers.Embedding(5, 2)(h)
    h = GradientProbe(name="embedding_probe")(h)
    model = keras.Model(tokens, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    x = np.array([[1, 2, 3]], "int32")
    with pytest.warns(UserWarning, match="not floating point"):
        results = activation_gradients(model, x, loss="sum")
    np.testing.assert_array_equal(results["token_probe"].activation, x)
    assert results["token_probe"].gradient is None
    assert results["embedding_probe"].gradient is not None


def test_model_nested_in_another(float64):
    keras.utils.set_random_seed(8)
    inner = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh", name="inner_dense"),
            GradientProbe(name="inner_probe"),
            keras.layers.Dense(3, activation="tanh", name="inner_out"),
        ],
        name="inner",
    )
    inputs = keras.Input((4,))
    h = GradientProbe(name="outer_probe")(inner(inputs))
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(h))
    model.compile(optimizer="sgd", loss="mse")
    x, y = rng_normal((6, 4), dtype="float64"), rng_normal((6, 2), 1, "float64")
    results = activation_gradients(model, x, y)
    assert list(results) == ["inner_probe", "outer_probe"]
    dense, out = inner.get_layer("inner_dense"), inner.get_layer("inner_out")
    check_probe(
        results["inner_probe"], lambda: dense(x), lambda h: mse(y, head(out(h)))
    )
    check_probe(results["outer_probe"], lambda: inner(x), lambda h: mse(y, head(h)))


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.hidden_probe = GradientProbe(name="hidden_probe")
        self.head = keras.layers.Dense(2)

    def call(self, inputs):
        return self.head(self.hidden_probe(self.hidden(inputs)))


def test_subclassed_model(float64):
    keras.utils.set_random_seed(9)
    model = Subclassed()
    x, y = rng_normal((6, 3), dtype="float64"), rng_normal((6, 2), 1, "float64")
    model(x)
    model.compile(optimizer="sgd", loss="mse")
    results = activation_gradients(model, x, y)
    assert list(results) == ["hidden_probe"]
    check_probe(
        results["hidden_probe"],
        lambda: model.hidden(x),
        lambda h: mse(y, model.head(h)),
    )


# --- bypass semantics and regularization --------------------------------------


def _dense_probe_dense(first_kwargs=None, head_kwargs=None):
    keras.utils.set_random_seed(10)
    inputs = keras.Input((4,))
    first = keras.layers.Dense(5, activation="relu", **(first_kwargs or {}))
    head = keras.layers.Dense(2, use_bias=False, **(head_kwargs or {}))
    h = GradientProbe(name="p")(first(inputs))
    model = keras.Model(inputs, head(h))
    model.compile(optimizer="sgd", loss="mse")
    x, y = rng_normal((6, 4)), rng_normal((6, 2), 1)
    return model, head, x, y


def _closed_form(activation, kernel, y):
    """dL/dh for a bias-free Dense after the probe and mean squared error."""
    return 2.0 / y.size * (activation @ kernel - y) @ kernel.T


def test_activity_regularizer_before_the_probe_is_not_counted():
    model, head, x, y = _dense_probe_dense(
        first_kwargs={"activity_regularizer": keras.regularizers.L2(0.5)}
    )
    got = activation_gradients(model, x, y)["p"]
    want = _closed_form(got.activation, head.kernel.numpy(), y)
    np.testing.assert_allclose(got.gradient, want, rtol=1e-5, atol=1e-7)
    # ... though it is part of the loss.
    out = _run(model, x, y, _config())
    hidden = got.activation
    data_loss = np.mean((hidden @ head.kernel.numpy() - y) ** 2)
    penalty = 0.5 * np.sum(hidden**2) / len(x)
    np.testing.assert_allclose(float(out["loss"]), data_loss + penalty, rtol=1e-5)


def test_regularizers_after_the_probe():
    # A kernel regularizer adds to the loss but not to dL/dh; an activity
    # regularizer on the output after the probe does change dL/dh.
    model, head, x, y = _dense_probe_dense(
        head_kwargs={
            "kernel_regularizer": keras.regularizers.L2(0.1),
            "activity_regularizer": keras.regularizers.L2(0.3),
        }
    )
    got = activation_gradients(model, x, y)["p"]
    kernel = head.kernel.numpy()
    output = got.activation @ kernel
    want = _closed_form(got.activation, kernel, y) + 0.6 / len(x) * output @ kernel.T
    np.testing.assert_allclose(got.gradient, want, rtol=1e-5, atol=1e-7)
    # Tape reference with every term written by hand.
    h = tf.constant(got.activation)
    with tf.GradientTape() as tape:
        tape.watch(h)
        out = head(h)
        loss = (
            mse(y, out)
            + 0.3 * tf.reduce_sum(out**2) / len(x)
            + 0.1 * tf.reduce_sum(head.kernel**2)
        )
    np.testing.assert_allclose(got.gradient, tape.gradient(loss, h), rtol=1e-5)
    # Regularization is part of loss="model".
    result = _run(model, x, y, _config())
    np.testing.assert_allclose(float(result["loss"]), float(loss), rtol=1e-5)


def _config(loss="model", training=False):
    from keras_actgrad._backends.base import PassConfig
    from keras_actgrad._engine import Unreduced

    return PassConfig(
        loss=loss, training=training, weight_gradients=False, reducer=Unreduced()
    )


def _run(model, x, y, config):
    engine = get_engine(model)
    return engine.run(engine.prepare(x, y, None, config.loss), config).outputs


def test_shared_probe_reached_twice_is_keyed_by_call():
    keras.utils.set_random_seed(11)
    probe = GradientProbe(name="shared")
    dense = keras.layers.Dense(3, activation="tanh")
    inputs = keras.Input((3,))
    first = probe(dense(inputs))
    second = probe(dense(first))
    model = keras.Model(inputs, second)
    x = rng_normal((2, 3))
    results = activation_gradients(model, x, loss="sum")
    assert list(results) == ["shared", "shared@1"]
    h1 = tf.constant(results["shared"].activation)
    with tf.GradientTape() as tape:
        tape.watch(h1)
        h2 = dense(h1)
        tape.watch(h2)
        total = tf.reduce_sum(h2)
    g1, g2 = tape.gradient(total, [h1, h2])
    np.testing.assert_allclose(results["shared"].gradient, g1, rtol=1e-5)
    np.testing.assert_allclose(results["shared@1"].gradient, g2, rtol=1e-5)


# --- losses -------------------------------------------------------------------


def _classifier():
    keras.utils.set_random_seed(12)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            GradientProbe(name="p"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _reference(model, x, loss_fn):
    hidden, logits = model.get_layer("hidden"), model.get_layer("logits")
    h = hidden(tf.constant(x))
    with tf.GradientTape() as tape:
        tape.watch(h)
        loss = loss_fn(logits(h))
    return tape.gradient(loss, h).numpy()


def test_loss_sum_callable_loss_object_and_name():
    model = _classifier()
    x, y = rng_normal((5, 4)), rng_normal((5, 3), 1)

    def check(loss, reference, labels=y):
        got = activation_gradients(model, x, labels, loss=loss)["p"].gradient
        np.testing.assert_allclose(
            got, _reference(model, x, reference), rtol=1e-4, atol=1e-7
        )

    check("sum", tf.reduce_sum, labels=None)
    # A single class score, as for saliency: no labels needed.
    check(
        lambda y_true, y_pred: y_pred[:, 1], lambda out: tf.reduce_mean(out[:, 1]), None
    )
    check(keras.losses.Huber(delta=0.5), lambda out: _huber(y, out, 0.5))
    check("mae", lambda out: tf.reduce_mean(tf.abs(out - y)))
    check(
        keras.losses.categorical_crossentropy,
        lambda out: tf.reduce_mean(
            -tf.reduce_sum(
                y
                * tf.math.log(
                    tf.clip_by_value(
                        out / tf.reduce_sum(out, -1, keepdims=True), 1e-7, 1 - 1e-7
                    )
                ),
                -1,
            )
        ),
    )


def _huber(y, out, delta):
    error = tf.abs(out - y)
    quadratic = tf.minimum(error, delta)
    return tf.reduce_mean(0.5 * quadratic**2 + delta * (error - quadratic))


def test_sample_weight():
    model = _classifier()
    x, y = rng_normal((5, 4)), rng_normal((5, 3), 1)
    weights = np.array([1.0, 0.0, 2.0, 0.5, 3.0], "float32")
    got = activation_gradients(model, x, y, sample_weight=weights)["p"]

    def weighted_mse(out):
        per_example = tf.reduce_mean(tf.square(out - y), -1)
        return tf.reduce_sum(per_example * weights) / len(x)

    np.testing.assert_allclose(
        got.gradient, _reference(model, x, weighted_mse), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_array_equal(got.gradient[1], 0.0)
    # A label-free callable is weighted too.
    score = activation_gradients(
        model, x, loss=lambda y_true, y_pred: y_pred[:, 0], sample_weight=weights
    )["p"]
    np.testing.assert_allclose(
        score.gradient,
        _reference(model, x, lambda out: tf.reduce_mean(out[:, 0] * weights)),
        rtol=1e-5,
        atol=1e-8,
    )


# --- state, tracing ------------------------------------------------------------


def _state(model):
    variables = list(model.variables) + list(model.optimizer.variables)
    variables += list(model.metrics_variables)
    variables.append(model.get_layer("drop").seed_generator.state)
    return [np.array(v.numpy(), copy=True) for v in variables]


@pytest.mark.parametrize("training", [False, True])
def test_probing_leaves_all_state_untouched(training):
    model = _mlp_with_batchnorm_and_dropout()
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["acc"]
    )
    x, labels = rng_normal((16, 4)), np.arange(16) % 3
    model.train_on_batch(x, labels)  # optimizer slots, metrics, seeds move
    before = _state(model)
    first = activation_gradients(model, x, labels, training=training)
    second = activation_gradients(model, x, labels, training=training)
    after = _state(model)
    assert len(before) == len(after) > 10
    for old, new in zip(before, after, strict=True):
        assert old.dtype == new.dtype
        assert old.tobytes() == new.tobytes()
    # Hence the same dropout mask and batch statistics on every call.
    for name in first:
        np.testing.assert_array_equal(first[name].gradient, second[name].gradient)
    # While a training step does move state.
    model.train_on_batch(x, labels)
    assert any(
        o.tobytes() != n.tobytes() for o, n in zip(before, _state(model), strict=True)
    )


def test_traced_once_per_input_signature():
    model = _classifier()
    engine = get_engine(model)
    x, y = rng_normal((5, 4)), rng_normal((5, 3), 1)
    activation_gradients(model, x, y)
    assert engine.trace_count == 1
    activation_gradients(model, x + 1.0, y * 2.0)
    assert engine.trace_count == 1
    activation_gradients(model, x[:3], y[:3])
    assert engine.trace_count == 2
    activation_gradients(model, x, y)
    activation_gradients(model, x[:3], y[:3])
    assert engine.trace_count == 2
    activation_gradients(model, x, loss="sum")
    assert engine.trace_count == 3
    assert get_engine(model) is engine


# --- bad input ------------------------------------------------------------------


def test_model_without_probes():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="No `GradientProbe`") as info:
        activation_gradients(model, np.zeros((2, 3)), loss="sum")
    assert "insert_probes" in str(info.value)
    assert "Received:" in str(info.value)


def test_input_of_the_wrong_shape():
    model = _classifier()
    with pytest.raises(ValueError, match="does not fit") as info:
        activation_gradients(model, np.zeros((2, 7), "float32"), loss="sum")
    message = str(info.value)
    assert "(None, 4)" in message
    assert "(2, 7)" in message
    assert "Received:" in message


def test_model_loss_without_labels_or_compile():
    model = _classifier()
    with pytest.raises(ValueError, match="needs the labels `y`") as info:
        activation_gradients(model, np.zeros((2, 4), "float32"))
    assert "loss='sum'" in str(info.value)
    uncompiled = insert_probes(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")])
    )
    with pytest.raises(ValueError, match="not compiled") as info:
        activation_gradients(uncompiled, np.zeros((2, 3)), np.zeros((2, 2)))
    assert "model.compile" in str(info.value)
    # Other losses work on an uncompiled model.
    result = activation_gradients(
        uncompiled, np.ones((2, 3)), np.zeros((2, 2)), loss="mse"
    )
    assert result["out_probe"].gradient.shape == (2, 2)


def test_unknown_loss_string_lists_accepted_ones():
    model = _classifier()
    with pytest.raises(ValueError, match="Unknown `loss`") as info:
        activation_gradients(model, np.zeros((2, 4)), np.zeros((2, 3)), loss="msee")
    message = str(info.value)
    assert "'model'" in message and "'sum'" in message
    assert "msee" in message
    with pytest.raises(ValueError, match="needs `y`"):
        activation_gradients(model, np.zeros((2, 4)), loss="mse")


def test_kernel_regularizer_downstream_does_not_break_model_loss():
    # Regression: Keras reads regularized weights from the stateless scope's
    # state mapping; without them `compute_loss` failed with a NoneType error.
    model, head, x, y = _dense_probe_dense(head_kwargs={"kernel_regularizer": "l2"})
    got = activation_gradients(model, x, y)["p"]
    want = _closed_form(got.activation, head.kernel.numpy(), y)
    np.testing.assert_allclose(got.gradient, want, rtol=1e-5, atol=1e-7)


def test_sequential_never_called_before_the_probe_pass():
    # Regression: `check_inputs` read `model.input`, which a Sequential model
    # only has once called; `insert_probes` output (and the callback's first
    # probe pass in `on_train_begin`) failed with an AttributeError.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, use_bias=False),
            GradientProbe(name="p"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((4, 3), dtype="float32")
    y = np.zeros((4, 2), dtype="float32")
    got = activation_gradients(model, x, y)["p"]
    # loss = mean((h - y)^2) over 8 entries, so dL/dh = 2 / 8 * (h - y).
    np.testing.assert_allclose(got.gradient, 0.25 * (got.activation - y), rtol=1e-6)


def test_unbuilt_model():
    model = Subclassed()
    with pytest.raises(ValueError, match="not been built") as info:
        activation_gradients(model, np.ones((2, 3), "float32"), loss="sum")
    assert "model.build" in str(info.value)
    assert "Received:" in str(info.value)


def test_inconsistent_batch_sizes():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], GradientProbe(name="p")(joined))
    model.compile(loss="mse")
    x = [np.ones((2, 2), "float32"), np.ones((3, 3), "float32")]
    with pytest.raises(ValueError, match="different numbers of examples") as info:
        activation_gradients(model, x, loss="sum")
    assert "(2, 2)" in str(info.value) and "(3, 3)" in str(info.value)
    x = [np.ones((2, 2), "float32"), np.ones((2, 3), "float32")]
    with pytest.raises(ValueError, match="y: \\[4\\]"):
        activation_gradients(model, x, np.ones((4, 5), "float32"))
    with pytest.raises(ValueError, match="takes 2 input"):
        activation_gradients(model, x[0], loss="sum")


def test_python_lists_are_arrays_and_do_not_retrace():
    model = _classifier()
    engine = get_engine(model)
    x = rng_normal((2, 4))
    want = activation_gradients(model, x, loss="sum")["p"].gradient
    got = activation_gradients(model, x.tolist(), loss="sum")["p"].gradient
    np.testing.assert_allclose(got, want, rtol=1e-6)
    activation_gradients(model, (x + 1).tolist(), loss="sum")
    assert engine.trace_count == 1


def test_probed_model_is_garbage_collected():
    # Regression: a global engine cache keyed by the model kept every probed
    # model (and its weights) alive through the compiled functions.
    model = _classifier()
    activation_gradients(model, rng_normal((2, 4)), loss="sum")
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None


def test_copied_model_gets_its_own_engine():
    model = _classifier()
    x = rng_normal((2, 4))
    before = activation_gradients(model, x, loss="sum")["p"].gradient
    clone = copy.copy(model)
    # A copy that carries the original's attributes, engine included.
    object.__setattr__(clone, "_keras_actgrad_engine", get_engine(model))
    assert get_engine(clone) is not get_engine(model)
    assert get_engine(clone) is get_engine(clone)
    np.testing.assert_allclose(
        activation_gradients(clone, x, loss="sum")["p"].gradient, before, rtol=1e-6
    )


def test_probes_on_the_outputs_of_a_multi_output_layer():
    keras.utils.set_random_seed(13)
    inputs = keras.Input((4, 3))
    lstm = keras.layers.LSTM(2, return_state=True, name="lstm")
    concat = keras.layers.Concatenate(name="concat")
    head = keras.layers.Dense(1, name="head")
    model = keras.Model(inputs, head(concat(list(lstm(inputs)))))
    model.compile(optimizer="sgd", loss="mse")
    probed = insert_probes(model, layers=["lstm"])
    x, y = rng_normal((3, 4, 3)), rng_normal((3, 1), 1)
    results = activation_gradients(probed, x, y)
    assert list(results) == ["lstm_0_probe", "lstm_1_probe", "lstm_2_probe"]
    states = [tf.constant(s) for s in lstm(x)]
    with tf.GradientTape() as tape:
        tape.watch(states)
        loss = mse(y, head(concat(states)))
    for result, state, gradient in zip(
        results.values(), states, tape.gradient(loss, states), strict=True
    ):
        np.testing.assert_allclose(result.activation, state, rtol=1e-6)
        np.testing.assert_allclose(result.gradient, gradient, rtol=1e-5, atol=1e-8)


def test_dataset_instead_of_arrays():
    model = _classifier()
    x, y = rng_normal((4, 4)), rng_normal((4, 3), 1)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    for data in (dataset, iter(dataset)):
        with pytest.raises(ValueError, match="take one first") as info:
            activation_gradients(model, data, loss="sum")
        assert "next(iter(dataset))" in str(info.value)
        assert "Received:" in str(info.value)
    # One batch of it works.
    batch_x, batch_y = next(iter(dataset))
    result = activation_gradients(model, batch_x, batch_y)["p"]
    assert result.gradient.shape == (2, 6)


class BranchOnTraining(keras.Model):
    """Reaches probe `noisy` only in training mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3)
        self.hidden_probe = GradientProbe(name="hidden")
        self.noisy_probe = GradientProbe(name="noisy")
        self.head = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        h = self.hidden_probe(self.hidden(inputs))
        if training:
            h = self.noisy_probe(h * 2.0)
        return self.head(h)


def test_probe_order_is_that_of_the_pass_that_ran():
    # Regression: the order came from the last trace, so a pass traced
    # earlier (training=False) reported the probes of a later trace
    # (training=True) and failed with a KeyError.
    model = BranchOnTraining()
    x = rng_normal((2, 4))
    model(x)
    with pytest.warns(UserWarning, match="'noisy'.*not reached"):
        first = activation_gradients(model, x, loss="sum")
    with_noise = activation_gradients(model, x, loss="sum", training=True)
    again = activation_gradients(model, x, loss="sum")
    assert get_engine(model).trace_count == 2
    assert list(with_noise) == ["hidden", "noisy"]
    assert list(first) == list(again) == ["hidden", "noisy"]
    assert again["noisy"].activation is None and again["noisy"].gradient is None
    np.testing.assert_array_equal(again["hidden"].gradient, first["hidden"].gradient)
    np.testing.assert_allclose(
        with_noise["hidden"].gradient, 2.0 * first["hidden"].gradient, rtol=1e-6
    )


def test_dict_batch_for_inputs_declared_as_a_list():
    # Regression: a dict keyed by input names was flattened in key order and
    # checked against the list of inputs (a wrong shape error).
    z, a = keras.Input((2,), name="z"), keras.Input((3,), name="a")
    joined = GradientProbe(name="p")(keras.layers.Concatenate()([z, a]))
    model = keras.Model([z, a], keras.layers.Dense(1)(joined))
    x_z, x_a = rng_normal((2, 2)), rng_normal((2, 3), 1)
    by_name = activation_gradients(model, {"a": x_a, "z": x_z}, loss="sum")["p"]
    by_position = activation_gradients(model, [x_z, x_a], loss="sum")["p"]
    np.testing.assert_array_equal(by_name.activation, np.concatenate([x_z, x_a], 1))
    np.testing.assert_array_equal(by_name.gradient, by_position.gradient)


def test_compiled_functions_are_bounded_and_each_uses_its_own_loss():
    """A new loss object per call compiles anew; the cache keeps only the
    most recent functions, and each call differentiates its own loss:
    d (k * sum(y_pred)) / d y_pred = k everywhere (closed form)."""
    from keras_actgrad._engine.engine import MAX_COMPILED_FUNCTIONS

    inputs = keras.Input((3,))
    outputs = GradientProbe(name="out")(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, outputs)
    x = np.ones((4, 3), "float32")
    for k in range(MAX_COMPILED_FUNCTIONS + 4):
        result = activation_gradients(
            model, x, loss=lambda y_true, y_pred, k=k: k * keras.ops.sum(y_pred)
        )
        np.testing.assert_array_equal(result["out"].gradient, np.full((4, 2), k))
    assert len(get_engine(model)._functions) == MAX_COMPILED_FUNCTIONS
