"""In-place measurement (`layers=`): any layer's output, no probe, no rebuild.

References: `tests/inplace_reference.py` (one eager pass with the backend's
own autodiff and zeros added to the selected outputs) and, for
`insert_probes` on operation nodes, the model's own predictions.
"""

from __future__ import annotations

import functools
import json
import zipfile

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_actgrad
from keras_actgrad._layers import _children, select_layers
from tests.inplace_reference import check, reference

RNG = np.random.default_rng(0)
MSE = keras.losses.MeanSquaredError()


def _sites(model, selection):
    return {site.name: site.layer for site in select_layers(model, selection)}


def functional_with_operations() -> keras.Model:
    """Operation nodes (`+`, `*`, `[...]`) and a layer called twice."""
    inputs = keras.Input((6,), name="x")
    shared = layers.Dense(6, name="shared")
    h = layers.Dense(6, activation="tanh", name="d1")(inputs)
    h2 = shared(h) + h
    h3 = shared(h2 * 0.5)
    outputs = layers.Dense(2, name="out")(h3[:, :4])
    return keras.Model(inputs, outputs, name="ops_model")


class Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = layers.MultiHeadAttention(2, 4, name="self_attention")
        self.mlp = keras.Sequential(
            [layers.Dense(8, activation="gelu"), layers.Dense(8)], name="mlp"
        )
        self.norm = layers.LayerNormalization(name="norm")

    def call(self, x, training=None):
        x = x + self.attention(x, x, training=training)
        return self.norm(x + self.mlp(x))


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.Dense(8, name="embed")
        self.blocks = [Block(name=f"block_{i}") for i in range(2)]
        self.head = layers.Dense(3, name="head")

    def call(self, x, training=None):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, training=training)
        return self.head(ops.mean(x, axis=1))


def subclassed() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    model = Net(name="net")
    x = RNG.normal(size=(2, 5, 4)).astype("float32")
    model(x)
    return model, x, RNG.normal(size=(2, 3)).astype("float32")


def test_children_of_keras_layers():
    # `_layers._children` reads Keras's private `Layer._layers` (3.15.1).
    attention = layers.MultiHeadAttention(2, 4)
    attention(np.zeros((1, 3, 4)), np.zeros((1, 3, 4)))
    names = [child.name for child in _children(attention)]
    assert {"query", "key", "value", "attention_output"} <= set(names)


def test_operation_nodes_and_a_shared_layer():
    model = functional_with_operations()
    x = RNG.normal(size=(3, 6)).astype("float32")
    y = RNG.normal(size=(3, 2)).astype("float32")
    results = keras_actgrad.activation_gradients(
        model, x, y, loss=MSE, layers=["d1", "shared", "out"]
    )
    assert list(results) == ["d1", "shared", "shared@1", "out"]
    expected = reference(model, x, y, MSE, _sites(model, keras.layers.Dense))
    check(results, expected)
    by_class = keras_actgrad.activation_gradients(
        model, x, y, loss=MSE, layers=keras.layers.Dense
    )
    check(by_class, expected)


@pytest.mark.compat
def test_subclassed_sublayers_by_glob_class_object_and_predicate():
    model, x, y = subclassed()
    selection = [
        "block_*",
        "*/self_attention/query",
        "**/attention_output",
        "block_1/mlp",
        model.head,
        lambda layer: layer.name == "embed",
    ]
    results = keras_actgrad.activation_gradients(
        model, x, y, loss=MSE, layers=selection
    )
    # In forward order: a block's output comes after its sublayers'.
    assert list(results) == [
        "net/embed",
        "net/block_0/self_attention/query",
        "net/block_0/self_attention/attention_output",
        "net/block_0",
        "net/block_1/self_attention/query",
        "net/block_1/self_attention/attention_output",
        "net/block_1/mlp",
        "net/block_1",
        "net/head",
    ]
    check(results, reference(model, x, y, MSE, _sites(model, selection)))
    # `*` stays within a path segment: 'block_*' selects the blocks only.
    assert list(_sites(model, "block_*")) == ["net/block_0", "net/block_1"]


def test_several_outputs_and_masks():
    inputs = keras.Input((5,), dtype="int32")
    embedded = layers.Embedding(10, 4, mask_zero=True, name="embedding")(inputs)
    sequence, state_h, _ = layers.LSTM(
        3, return_sequences=True, return_state=True, name="lstm"
    )(embedded)
    pooled = layers.GlobalAveragePooling1D(name="pool")(sequence)
    outputs = layers.Dense(1, name="head")(pooled + state_h)
    model = keras.Model(inputs, outputs)
    x = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]], "int32")
    y = np.ones((2, 1), "float32")
    selection = ["embedding", "lstm", "pool"]
    results = keras_actgrad.activation_gradients(
        model, x, y, loss=MSE, layers=selection
    )
    assert list(results) == ["embedding", "lstm:0", "lstm:1", "lstm:2", "pool"]
    assert results["lstm:2"].gradient is None  # the cell state is unused
    # The masks still reach the LSTM and the pooling: same pooled output.
    pooled_model = keras.Model(inputs, pooled)
    np.testing.assert_allclose(
        results["pool"].activation,
        ops.convert_to_numpy(pooled_model(x)),
        rtol=1e-6,
        atol=1e-7,
    )
    check(results, reference(model, x, y, MSE, _sites(model, selection)))


def test_no_match_lists_close_matches():
    model, x, y = subclassed()
    with pytest.raises(ValueError, match="close matches") as info:
        keras_actgrad.activation_gradients(
            model, x, y, loss=MSE, layers="*/self_atention/quer"
        )
    assert "net/block_0/self_attention/query" in str(info.value)
    with pytest.raises(ValueError, match="selects no layer"):
        keras_actgrad.activation_gradients(
            model, x, y, loss=MSE, layers=keras.layers.Conv2D
        )


def test_layers_none_keeps_the_probes_and_layers_ignores_them():
    inputs = keras.Input((4,))
    h = layers.Dense(5, name="dense")(inputs)
    h = keras_actgrad.GradientProbe(name="probe")(h)
    model = keras.Model(inputs, layers.Dense(1, name="out")(h))
    x = RNG.normal(size=(2, 4)).astype("float32")
    y = np.ones((2, 1), "float32")
    probed = keras_actgrad.activation_gradients(model, x, y, loss=MSE)
    in_place = keras_actgrad.activation_gradients(model, x, y, loss=MSE, layers="dense")
    assert list(probed) == ["probe"] and list(in_place) == ["dense"]
    np.testing.assert_allclose(
        in_place["dense"].gradient, probed["probe"].gradient, rtol=1e-6
    )


def _saved(model, path):
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    return config, [ops.convert_to_numpy(w) for w in model.weights]


def test_the_model_is_left_as_it_was(tmp_path):
    model = functional_with_operations()
    model.compile(optimizer="adam", loss="mse")
    x = RNG.normal(size=(3, 6)).astype("float32")
    y = RNG.normal(size=(3, 2)).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    every = [layer for _, layer in _all(model)]
    before = {id(layer): dict(vars(layer)) for layer in every}
    predictions = ops.convert_to_numpy(model(x))
    config, weights = _saved(model, tmp_path / "before.keras")
    compiled = model.get_compile_config()
    keras_actgrad.activation_gradients(model, x, y, layers=keras.layers.Layer)
    for layer in every:
        assert "call" not in vars(layer)
        assert vars(layer).keys() == before[id(layer)].keys(), layer.name
        assert all(vars(layer)[k] is v for k, v in before[id(layer)].items())
    assert type(model) is keras.Model or type(model).__name__ == "Functional"
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), predictions)
    config_after, weights_after = _saved(model, tmp_path / "after.keras")
    assert config_after == config and model.get_compile_config() == compiled
    for a, b in zip(weights, weights_after, strict=True):
        np.testing.assert_array_equal(a, b)
    reloaded = keras.saving.load_model(tmp_path / "after.keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(reloaded(x)), predictions)
    # Training afterwards is as without the measurement.
    model.fit(x, y, epochs=1, verbose=0)


def _all(model):
    from keras_actgrad._layers import _walk

    return _walk(model)


def test_insert_probes_passes_operation_nodes_through():
    model = functional_with_operations()
    x = RNG.normal(size=(3, 6)).astype("float32")
    y = RNG.normal(size=(3, 2)).astype("float32")
    probed = keras_actgrad.insert_probes(model)
    assert [p.name for p in keras_actgrad.find_probes(probed)] == [
        "d1_probe",
        "shared_probe",
        "shared_probe_2",  # the second call of `shared` gets its own probe
        "out_probe",
    ]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(probed(x)), ops.convert_to_numpy(model(x))
    )
    stripped = keras_actgrad.strip_probes(probed)
    assert keras_actgrad.find_probes(stripped) == []
    np.testing.assert_array_equal(
        ops.convert_to_numpy(stripped(x)), ops.convert_to_numpy(model(x))
    )
    # The probes measure what in-place measurement measures.
    by_probe = keras_actgrad.activation_gradients(probed, x, y, loss=MSE)
    in_place = keras_actgrad.activation_gradients(
        model, x, y, loss=MSE, layers=keras.layers.Dense
    )
    probes = {"d1": "d1_probe", "shared": "shared_probe"}
    probes.update({"shared@1": "shared_probe_2", "out": "out_probe"})
    for name, probe in probes.items():
        np.testing.assert_allclose(
            by_probe[probe].gradient, in_place[name].gradient, rtol=1e-5, atol=1e-7
        )


class ClassScore:
    def __call__(self, y_true, y_pred):
        return ops.sum(y_pred[:, 1])


def _score(y_true, y_pred, index):
    return ops.sum(y_pred[:, index])


@pytest.mark.parametrize(
    "loss",
    [
        lambda y_true, y_pred: ops.sum(y_pred[:, 1]),
        functools.partial(_score, index=1),
        ClassScore(),
    ],
    ids=["lambda", "partial", "object"],
)
@pytest.mark.parametrize("with_labels", [False, True])
def test_callable_losses_of_any_name(loss, with_labels):
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(3, name="dense")], name="score"
    )
    x = RNG.normal(size=(2, 4)).astype("float32")
    y = np.zeros((2, 3), "float32") if with_labels else None
    results = keras_actgrad.activation_gradients(model, x, y, loss=loss, layers="dense")
    # d/d(output) of sum(output[:, 1]) (the mean over one scalar): e_1.
    expected = np.zeros((2, 3), "float32")
    expected[:, 1] = 1.0
    assert list(results) == ["score/dense"]  # a Sequential's layer path
    np.testing.assert_allclose(results["score/dense"].gradient, expected, rtol=1e-6)


@pytest.mark.compat
def test_callback_with_layers_in_fit():
    model, x, y = subclassed()
    model.compile(optimizer="sgd", loss="mse")
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), layers=["block_*", "**/attention_output"], log_statistics=["grad_norm"]
    )
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert callback.probe_order == [
        "net/block_0/self_attention/attention_output",
        "net/block_0",
        "net/block_1/self_attention/attention_output",
        "net/block_1",
    ]
    key = "actgrad/net/block_1/grad_norm"
    assert key in history.history, sorted(history.history)
    norms = history.history[key]
    assert len(norms) == 2 and all(np.isfinite(norms))
    assert "call" not in vars(model.blocks[0])
