"""Property-based: random Sequential stacks with probes at random places.

For every generated stack, `activation_gradients` must agree with a
hand-split `tf.GradientTape` reference: the layers called one by one (inside
a `keras.StatelessScope`, as the probe pass, so Dropout draws the same mask
and BatchNormalization's updates are dropped), the tape watching the tensor
at each probe position, the MSE loss written by hand.
"""

import keras
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from keras_actgrad import GradientProbe, activation_gradients  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the reference is a hand-split tf.GradientTape",
)

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

LAYERS = ("dense", "conv1d", "activation", "batchnorm", "dropout", "layernorm")
ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu", "linear")


def make_layer(kind, width, activation):
    if kind == "dense":
        return keras.layers.Dense(width, activation=activation)
    if kind == "conv1d":
        return keras.layers.Conv1D(width, 3, padding="same", activation=activation)
    if kind == "activation":
        return keras.layers.Activation(activation)
    if kind == "batchnorm":
        return keras.layers.BatchNormalization()
    if kind == "dropout":
        return keras.layers.Dropout(0.3)
    return keras.layers.LayerNormalization()


layer_spec = st.tuples(
    st.sampled_from(LAYERS),
    st.integers(2, 6),  # width of Dense / Conv1D
    st.sampled_from(ACTIVATIONS),
    st.booleans(),  # a probe after this layer
)


@st.composite
def stacks(draw):
    specs = draw(st.lists(layer_spec, min_size=1, max_size=5))
    probe_at_input = draw(st.booleans())
    if not probe_at_input and not any(spec[3] for spec in specs):
        # At least one probe: after a random layer.
        index = draw(st.integers(0, len(specs) - 1))
        kind, width, activation, _ = specs[index]
        specs[index] = (kind, width, activation, True)
    return {
        "specs": specs,
        "probe_at_input": probe_at_input,
        "batch": draw(st.integers(2, 6)),
        "steps": draw(st.integers(3, 6)),
        "channels": draw(st.integers(1, 4)),
        "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case):
    """The model and, in order, the layers and where probes follow them."""
    keras.utils.set_random_seed(case["seed"])
    plan = []  # ("layer", layer) or ("probe", name)
    if case["probe_at_input"]:
        plan.append(("probe", "probe_input"))
    for i, (kind, width, activation, probed) in enumerate(case["specs"]):
        plan.append(("layer", make_layer(kind, width, activation)))
        if probed:
            plan.append(("probe", f"probe_{i}"))
    plan.append(("layer", keras.layers.Dense(2)))
    inputs = keras.Input((case["steps"], case["channels"]))
    layers = [
        GradientProbe(name=item) if what == "probe" else item for what, item in plan
    ]
    model = keras.Sequential([inputs, *layers])
    model.compile(optimizer="sgd", loss="mse")
    return model, plan


def reference(plan, x, y, training):
    """Hand-split tape: gradient of the hand-written MSE at each probe."""
    watched = {}
    with keras.StatelessScope():
        with tf.GradientTape() as tape:
            h = tf.constant(x)
            for what, item in plan:
                if what == "probe":
                    tape.watch(h)
                    watched[item] = h
                else:
                    h = item(h, training=training)
            loss = tf.reduce_mean(tf.square(h - y))
    names = list(watched)
    grads = tape.gradient(loss, [watched[name] for name in names])
    return {
        name: (watched[name].numpy(), grad.numpy())
        for name, grad in zip(names, grads, strict=True)
    }


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=stacks())
def test_random_stacks_agree_with_hand_split_tape(case):
    model, plan = build(case)
    rng = np.random.default_rng(case["seed"])
    x = rng.normal(size=(case["batch"], case["steps"], case["channels"]))
    x = x.astype("float32")
    y = rng.normal(size=(case["batch"], case["steps"], 2)).astype("float32")
    training = case["training"]
    results = activation_gradients(model, x, y, training=training)
    expected = reference(plan, x, y, training)
    assert list(results) == list(expected)  # forward order
    for name, (activation, gradient) in expected.items():
        scale = max(1.0, float(np.abs(gradient).max()))
        np.testing.assert_allclose(
            results[name].activation, activation, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            results[name].gradient, gradient, rtol=1e-4, atol=1e-6 * scale
        )
