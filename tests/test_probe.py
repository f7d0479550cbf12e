"""Tests for `GradientProbe`, `find_probes`, `insert_probes`, `strip_probes`."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientProbe, find_probes, insert_probes, strip_probes
from keras_actgrad._context import tapping


def _bits(value):
    array = np.asarray(keras.ops.convert_to_numpy(value))
    return array.dtype, array.shape, array.tobytes()


def _names(layers):
    return [layer.name for layer in layers]


def _mlp(name="mlp"):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="relu", name="d1"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(5, activation="tanh", name="d2"),
            keras.layers.Dense(2, name="head"),
        ],
        name=name,
    )


def _data(n=8, features=4, outputs=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.normal(size=(n, outputs)).astype("float32")
    return x, y


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="relu", name="hidden")
        self.hidden_probe = GradientProbe(name="hidden_probe")
        self.head = keras.layers.Dense(2, name="head")
        self.head_probe = GradientProbe(name="head_probe")

    def call(self, inputs):
        h = self.hidden_probe(self.hidden(inputs))
        return self.head_probe(self.head(h))


# --- GradientProbe ----------------------------------------------------------


# JAX runs with 64-bit types disabled unless `jax_enable_x64` is set.
FLOAT64 = pytest.param(
    "float64",
    marks=pytest.mark.skipif(
        keras.backend.backend() == "jax"
        and not __import__("jax").config.jax_enable_x64,
        reason="JAX has 64-bit types disabled by default (jax_enable_x64): "
        "float64 arrays are float32 there",
    ),
)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", FLOAT64])
@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4), (1, 2, 3, 2)])
def test_probe_output_is_bit_identical(dtype, shape):
    x = keras.random.normal(shape, dtype=dtype, seed=1)
    probe = GradientProbe()
    y = probe(x)
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    assert _bits(y) == _bits(x)


@pytest.mark.parametrize("dtype", ["float16", FLOAT64])
def test_probe_is_bit_identical_inside_a_model(dtype):
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(dtype)
    model = keras.Sequential([keras.Input((3, 2), dtype=dtype), GradientProbe()])
    # (Not `predict`: its data adapter casts float64 arrays to floatx.)
    y = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(x)))
    assert y.dtype == np.dtype(dtype)
    assert y.tobytes() == x.tobytes()
    compiled = keras.ops.convert_to_numpy(model.predict_on_batch(x))
    assert compiled.dtype == np.dtype(dtype)


def test_probe_has_no_weights():
    model = keras.Sequential([keras.Input((3,)), GradientProbe(name="p")])
    probe = model.get_layer("p")
    assert probe.weights == []
    assert probe.count_params() == 0
    assert model.count_params() == 0


def test_mask_passes_through_probe_to_lstm():
    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    lstm = keras.layers.LSTM(3)
    tokens = keras.Input((None,), dtype="int32")
    probed = keras.Model(tokens, lstm(GradientProbe(name="p")(embedding(tokens))))
    padded = np.array([[3, 5, 0, 0], [7, 1, 2, 0]], dtype="int32")
    # With the mask reaching the LSTM, trailing padding changes nothing.
    short_0 = probed.predict(padded[:1, :2], verbose=0)
    short_1 = probed.predict(padded[1:, :3], verbose=0)
    out = probed.predict(padded, verbose=0)
    np.testing.assert_allclose(out[0], short_0[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], short_1[0], rtol=1e-6, atol=1e-6)
    # And the probe's output carries the embedding's mask.
    probe = probed.get_layer("p")
    mask = probe.compute_mask(embedding(padded), embedding.compute_mask(padded))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), padded != 0)


def test_probe_config_round_trip():
    probe = GradientProbe(name="my_probe", dtype="float64")
    config = probe.get_config()
    clone = GradientProbe.from_config(config)
    assert clone.name == "my_probe"
    assert clone.dtype == "float64"
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(probe)
    assert serialized["registered_name"] == "keras_actgrad>GradientProbe"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, GradientProbe)
    assert restored.name == "my_probe"


def test_saved_model_with_probes_loads_without_custom_objects(tmp_path):
    model = insert_probes(_mlp())
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path / "probed.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert _names(find_probes(loaded)) == _names(find_probes(model))
    assert all(isinstance(p, GradientProbe) for p in find_probes(loaded))
    x, _ = _data()
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_probes_change_nothing_in_jit_compiled_fit(monkeypatch):
    if keras.backend.backend() == "torch":
        # Keras calls `torch.compile(step)`: TorchDynamo traces the probes
        # (graph breaks, guards) whatever the compiler behind it; Inductor's
        # C++ code generation would take minutes of CI for nothing of ours.
        import functools

        import torch

        monkeypatch.setattr(
            torch, "compile", functools.partial(torch.compile, backend="aot_eager")
        )
    x, y = _data(n=32)
    keras.utils.set_random_seed(0)
    plain = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    initial = [w.numpy() for w in plain.weights]
    probed = insert_probes(plain)
    probed.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert len(find_probes(probed)) == 2
    history = probed.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after_probed = [w.numpy() for w in plain.weights]
    assert not np.array_equal(after_probed[0], initial[0])
    # The same training without probes, from the same start, lands on the
    # same weights.
    for variable, value in zip(plain.weights, initial, strict=True):
        variable.assign(value)
    plain.compile(optimizer="sgd", loss="mse", jit_compile=True)
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(after_probed, [w.numpy() for w in plain.weights], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_probe_rejects_nothing_it_should_accept():
    # A probe accepts any base-layer keyword argument.
    probe = GradientProbe(name="p", trainable=False, dtype="float16")
    assert probe.name == "p"
    assert probe.dtype == "float16"


# --- find_probes --------------------------------------------------------------


def test_find_probes_in_forward_order_not_creation_order():
    second = GradientProbe(name="a_second")
    first = GradientProbe(name="z_first")
    inputs = keras.Input((3,))
    h = first(keras.layers.Dense(4)(inputs))
    h = second(keras.layers.Dense(4)(h))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    assert find_probes(model) == [first, second]


def test_find_probes_in_nested_sequential_inside_functional():
    inner = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            GradientProbe(name="inner_probe"),
        ],
        name="inner",
    )
    inputs = keras.Input((4,))
    h = GradientProbe(name="before")(inputs)
    h = inner(h)
    outputs = GradientProbe(name="after")(keras.layers.Dense(2)(h))
    model = keras.Model(inputs, outputs)
    assert _names(find_probes(model)) == ["before", "inner_probe", "after"]


def test_find_probes_in_functional_inside_sequential():
    inputs = keras.Input((4,))
    h = GradientProbe(name="inner_probe")(keras.layers.Dense(3)(inputs))
    inner = keras.Model(inputs, h, name="inner")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            GradientProbe(name="first"),
            inner,
            keras.layers.Dense(2),
            GradientProbe(name="last"),
        ]
    )
    assert _names(find_probes(model)) == ["first", "inner_probe", "last"]


def test_find_probes_in_subclassed_model():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    assert _names(find_probes(model)) == ["hidden_probe", "head_probe"]


def test_find_probes_lists_a_shared_probe_once():
    probe = GradientProbe(name="shared")
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(3)
    h = probe(dense(inputs))
    h = probe(dense(h))
    model = keras.Model(inputs, h)
    assert find_probes(model) == [probe]


def test_find_probes_without_probes_and_bad_argument():
    assert find_probes(_mlp()) == []
    with pytest.raises(TypeError, match="Keras model or layer"):
        find_probes("not a model")


# --- insert_probes ------------------------------------------------------------


def test_insert_probes_default_is_after_every_layer_with_weights():
    model = _mlp()
    probed = insert_probes(model)
    names = _names(probed.layers)
    assert names == ["d1", "d1_probe", "drop", "d2", "d2_probe", "head", "head_probe"]
    assert _names(find_probes(probed)) == ["d1_probe", "d2_probe", "head_probe"]


def test_insert_probes_keeps_predictions_and_shares_layers():
    model = _mlp()
    probed = insert_probes(model)
    for name in ["d1", "drop", "d2", "head"]:
        assert probed.get_layer(name) is model.get_layer(name)
    for new, old in zip(probed.weights, model.weights, strict=True):
        assert new is old
    x, _ = _data()
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # Same objects: a change to the original shows in the probed model.
    kernel = model.get_layer("head").kernel
    kernel.assign(kernel.numpy() * 2.0)
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_insert_probes_selects_by_name_class_and_predicate():
    model = _mlp()
    by_name = insert_probes(model, layers=["d2"])
    assert _names(find_probes(by_name)) == ["d2_probe"]
    by_single_name = insert_probes(model, layers="head")
    assert _names(find_probes(by_single_name)) == ["head_probe"]
    by_class = insert_probes(model, layers=keras.layers.Dropout)
    assert _names(find_probes(by_class)) == ["drop_probe"]
    mixed = insert_probes(model, layers=["head", keras.layers.Dropout])
    assert _names(find_probes(mixed)) == ["drop_probe", "head_probe"]
    by_predicate = insert_probes(
        model,
        layers=lambda layer: (
            getattr(layer, "activation", None) is not None
            and layer.activation.__name__ == "relu"
        ),
    )
    assert _names(find_probes(by_predicate)) == ["d1_probe"]


def test_insert_probes_functional_residual():
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="a")(inputs)
    r = keras.layers.Dense(4, name="b")(h)
    h = keras.layers.Add(name="add")([h, r])
    outputs = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inputs, outputs)
    probed = insert_probes(model, layers=["a", "add"])
    assert _names(find_probes(probed)) == ["a_probe", "add_probe"]
    x, _ = _data()
    # The probe sits on the layer's output, so both consumers (the skip into
    # `add` and `b`) read the probe: zeroing the probe's output during a
    # probe pass zeroes both.
    with tapping(lambda probe, t: t * 0 if probe.name == "a_probe" else t):
        zeroed = keras.ops.convert_to_numpy(probed(x))
    zeros = np.zeros((len(x), 4), "float32")
    expected = model.get_layer("out")(keras.ops.add(model.get_layer("b")(zeros), zeros))
    np.testing.assert_allclose(zeroed, keras.ops.convert_to_numpy(expected), atol=1e-6)
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_insert_probes_into_nested_models():
    inner_seq = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")],
        name="inner_seq",
    )
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="outer_dense")(inputs)
    outputs = keras.layers.Dense(1, name="outer_head")(inner_seq(h))
    model = keras.Model(inputs, outputs)
    probed = insert_probes(model)
    assert _names(find_probes(probed)) == [
        "outer_dense_probe",
        "inner_dense_probe",
        "outer_head_probe",
    ]
    inner_new = probed.get_layer("inner_seq")
    assert inner_new is not inner_seq  # rebuilt with a probe inside
    assert inner_new.get_layer("inner_dense") is inner_seq.get_layer("inner_dense")
    x, _ = _data()
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), model.predict(x, verbose=0)
    )

    # A Functional model inside a Sequential one.
    f_in = keras.Input((4,))
    inner_fn = keras.Model(
        f_in, keras.layers.Dense(3, name="fn_dense")(f_in), name="inner_fn"
    )
    seq = keras.Sequential(
        [keras.Input((4,)), inner_fn, keras.layers.Dense(2, name="seq_head")]
    )
    probed_seq = insert_probes(seq)
    assert _names(find_probes(probed_seq)) == ["fn_dense_probe", "seq_head_probe"]
    np.testing.assert_array_equal(
        probed_seq.predict(x, verbose=0), seq.predict(x, verbose=0)
    )


def _multi_io():
    image = keras.Input((4,), name="image")
    meta = keras.Input((2,), name="meta")
    h = keras.layers.Dense(5, activation="relu", name="trunk")(image)
    h = keras.layers.Concatenate(name="concat")([h, meta])
    a = keras.layers.Dense(1, name="a")(h)
    b = keras.layers.Dense(3, name="b")(h)
    return keras.Model({"image": image, "meta": meta}, {"a": a, "b": b})


def _multi_io_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "image": rng.normal(size=(n, 4)).astype("float32"),
        "meta": rng.normal(size=(n, 2)).astype("float32"),
    }
    y = {
        "a": rng.normal(size=(n, 1)).astype("float32"),
        "b": rng.normal(size=(n, 3)).astype("float32"),
    }
    return x, y


def test_insert_probes_multi_input_multi_output_dict():
    model = _multi_io()
    model.compile(
        optimizer="sgd",
        loss={"a": "mse", "b": "mae"},
        loss_weights={"a": 1.0, "b": 0.5},
    )
    probed = insert_probes(model)
    assert _names(find_probes(probed)) == ["trunk_probe", "a_probe", "b_probe"]
    x, y = _multi_io_data()
    got = probed.predict(x, verbose=0)
    want = model.predict(x, verbose=0)
    assert set(got) == {"a", "b"}
    for key in ("a", "b"):
        np.testing.assert_array_equal(got[key], want[key])
    # Dict-keyed losses still work, and the loss is the original model's.
    assert probed.compiled
    np.testing.assert_allclose(
        probed.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6
    )
    probed.fit(x, y, epochs=1, verbose=0)


def test_insert_probes_model_stays_compiled_and_fits_right_away():
    model = _mlp()
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    probed = insert_probes(model)
    assert probed.compiled
    assert probed.optimizer is optimizer
    x, y = _data(n=16)
    before = model.get_layer("d1").kernel.numpy()
    history = probed.fit(x, y, epochs=1, verbose=0)
    assert "mae" in history.history
    # Training the probed model trains the original's weights.
    assert not np.array_equal(model.get_layer("d1").kernel.numpy(), before)


def test_insert_probes_uncompiled_model_stays_uncompiled():
    probed = insert_probes(_mlp())
    assert not probed.compiled


def test_insert_probes_names_do_not_collide():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, name="d"),
            keras.layers.Dense(3, name="d_probe"),
        ]
    )
    probed = insert_probes(model)
    names = _names(find_probes(probed))
    assert len(set(names)) == 2
    assert names[0] != "d_probe"


def test_insert_probes_on_subclassed_model_says_how_to_place_probes():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed") as info:
        insert_probes(model)
    message = str(info.value)
    assert "GradientProbe" in message
    assert "call()" in message
    assert "__init__" in message
    assert "Received:" in message


def test_insert_probes_unknown_layer_name_lists_available_names():
    with pytest.raises(ValueError, match="no layer named") as info:
        insert_probes(_mlp(), layers=["d1", "dense_42"])
    message = str(info.value)
    assert "dense_42" in message
    for name in ["d1", "d2", "drop", "head"]:
        assert name in message
    assert "Received:" in message


def test_insert_probes_bad_selector():
    with pytest.raises(ValueError, match="layer names, layer classes"):
        insert_probes(_mlp(), layers=[3])
    with pytest.raises(TypeError, match="keras.Model"):
        insert_probes(keras.layers.Dense(3))


def test_insert_probes_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="built") as info:
        insert_probes(model)
    assert "keras.Input" in str(info.value)
    assert "Received:" in str(info.value)


# --- strip_probes -------------------------------------------------------------


def test_strip_probes_same_predictions_bit_for_bit():
    model = _mlp()
    probed = insert_probes(model)
    stripped = strip_probes(probed)
    assert find_probes(stripped) == []
    assert _names(stripped.layers) == _names(model.layers)
    for name in ["d1", "d2", "head"]:
        assert stripped.get_layer(name) is model.get_layer(name)
    x, _ = _data()
    np.testing.assert_array_equal(
        stripped.predict(x, verbose=0), probed.predict(x, verbose=0)
    )


def test_strip_probes_nested_and_multi_output():
    model = _multi_io()
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mae"})
    probed = insert_probes(model)
    stripped = strip_probes(probed)
    assert find_probes(stripped) == []
    assert stripped.compiled
    x, y = _multi_io_data()
    got, want = stripped.predict(x, verbose=0), probed.predict(x, verbose=0)
    for key in ("a", "b"):
        np.testing.assert_array_equal(got[key], want[key])
    stripped.fit(x, y, epochs=1, verbose=0)

    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), GradientProbe(name="ip")]
    )
    inputs = keras.Input((4,))
    outer = keras.Model(inputs, GradientProbe(name="op")(inner(inputs)))
    stripped_outer = strip_probes(outer)
    assert find_probes(stripped_outer) == []
    xs, _ = _data()
    np.testing.assert_array_equal(
        stripped_outer.predict(xs, verbose=0), outer.predict(xs, verbose=0)
    )


def test_strip_probes_rejects_subclassed_model():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="call()"):
        strip_probes(model)


def test_public_names():
    assert set(keras_actgrad.__all__) >= {
        "GradientProbe",
        "find_probes",
        "insert_probes",
        "strip_probes",
        "activation_gradients",
        "ActivationGradient",
    }


def test_insert_probes_one_probe_per_output_of_a_multi_output_layer():
    inputs = keras.Input((4, 3))
    out, h, c = keras.layers.LSTM(2, return_state=True, name="lstm")(inputs)
    joined = keras.layers.Concatenate(name="concat")([out, h, c])
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(joined))
    probed = insert_probes(model, layers=["lstm"])
    assert _names(find_probes(probed)) == [
        "lstm_0_probe",
        "lstm_1_probe",
        "lstm_2_probe",
    ]
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    np.testing.assert_array_equal(
        probed.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    np.testing.assert_array_equal(
        strip_probes(probed).predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_probe_on_several_tensors_says_to_use_one_probe_per_tensor():
    a, b = keras.Input((2,)), keras.Input((2,))
    with pytest.raises(ValueError, match="one probe per tensor") as info:
        GradientProbe(name="p")([a, b])
    assert "Received:" in str(info.value)
    with pytest.raises(ValueError, match="one probe per tensor"):
        GradientProbe(name="p")([np.zeros((1, 2)), np.zeros((1, 2))])


def test_insert_probes_on_an_input_says_how_to_probe_inputs():
    inputs = keras.Input((4,), name="pixels")
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))
    for layers in (["pixels"], keras.layers.InputLayer):
        with pytest.raises(ValueError, match="inputs of model") as info:
            insert_probes(model, layers=layers)
        message = str(info.value)
        assert "pixels" in message
        assert "GradientProbe(name='input_probe')(inputs)" in message
        assert "Received:" in message


def test_insert_probes_name_of_a_sublayer_inside_a_layer():
    inputs = keras.Input((3, 4))
    attention = keras.layers.MultiHeadAttention(2, 2, name="mha")
    outputs = keras.layers.Dense(1, name="head")(attention(inputs, inputs))
    model = keras.Model(inputs, outputs)
    probed = insert_probes(model)
    assert _names(find_probes(probed)) == ["mha_probe", "head_probe"]
    with pytest.raises(ValueError, match="sublayers inside a layer") as info:
        insert_probes(model, layers=["query"])
    message = str(info.value)
    assert "'query'" in message
    assert "call()" in message
    assert "Available layer names" in message and "'mha'" in message


def test_insert_probes_selection_that_matches_nothing():
    model = _mlp()
    with pytest.raises(ValueError, match="selected no layer") as info:
        insert_probes(model, layers=keras.layers.Conv2D)
    assert "d1" in str(info.value) and "Received:" in str(info.value)
    with pytest.raises(ValueError, match="selected no layer"):
        insert_probes(model, layers=lambda layer: False)
    weightless = keras.Sequential([keras.Input((3,)), keras.layers.Activation("relu")])
    with pytest.raises(ValueError, match="selected no layer"):
        insert_probes(weightless)


@pytest.mark.parametrize(
    "imports",
    ["import keras, keras_actgrad", "import keras_actgrad\nimport keras"],
    ids=["keras_first", "package_first"],
)
def test_saved_model_loads_in_a_fresh_process_after_importing_the_package(
    tmp_path, imports
):
    # The package imports Keras lazily; its probes must be registered for
    # `load_model` whichever is imported first, before any attribute is read.
    model = insert_probes(_mlp())
    path = tmp_path / "probed.keras"
    model.save(path)
    x, _ = _data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    script = (
        f"import sys, numpy as np\n{imports}\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "probes = [p.name for p in keras_actgrad.find_probes(model)]\n"
        "assert probes == ['d1_probe', 'd2_probe', 'head_probe'], probes\n"
        "x, y = np.load(sys.argv[2]), np.load(sys.argv[3])\n"
        "np.testing.assert_array_equal(model.predict(x, verbose=0), y)\n"
        "print('loaded')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout


def test_insert_probes_twice_adds_no_second_probe():
    model = _multi_io()
    once = insert_probes(model)
    twice = insert_probes(once)
    assert _names(find_probes(twice)) == _names(find_probes(once))
    seq = insert_probes(_mlp())
    assert _names(find_probes(insert_probes(seq))) == _names(find_probes(seq))
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((4,))
    nested = keras.Model(inputs, keras.layers.Dense(1, name="top")(inner(inputs)))
    nested_once = insert_probes(nested)
    assert _names(find_probes(nested_once)) == ["inner_dense_probe", "top_probe"]
    assert _names(find_probes(insert_probes(nested_once))) == [
        "inner_dense_probe",
        "top_probe",
    ]
    # A hand-placed probe counts too: only the unprobed layers get one.
    inputs = keras.Input((4,))
    h = GradientProbe(name="mine")(keras.layers.Dense(3, name="a")(inputs))
    partly = keras.Model(inputs, keras.layers.Dense(2, name="b")(h))
    assert _names(find_probes(insert_probes(partly))) == ["mine", "b_probe"]
