"""KerasHub models measured in place: backbones, their blocks and
sublayers, two tasks, the callback inside `fit`; the models left as they
were (`generate()`, `save`/`load`, predictions bit-identical).

Small random configs (no download). Reference: `tests/inplace_reference.py`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

import keras_actgrad
from keras_actgrad._layers import select_layers
from tests.inplace_reference import check, reference

keras_hub = pytest.importorskip("keras_hub")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:keras_hub.*")

VOCABULARY, LENGTH = 50, 8


def _tokens(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, VOCABULARY, size=(2, LENGTH)).astype("int32")


def _text(**extra: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "token_ids": _tokens(),
        "padding_mask": np.ones((2, LENGTH), "int32"),
        **extra,
    }


def _backbone(name: str, **options: Any):
    models = keras_hub.models
    small = dict(
        vocabulary_size=VOCABULARY, num_layers=2, hidden_dim=16, intermediate_dim=32
    )
    if name == "bert":
        model = models.BertBackbone(num_heads=2, max_sequence_length=LENGTH, **small)
        return model, _text(segment_ids=np.zeros((2, LENGTH), "int32"))
    if name == "gpt2":
        return models.GPT2Backbone(
            num_heads=2, max_sequence_length=LENGTH, **small, **options
        ), _text()
    if name == "gemma":
        model = models.GemmaBackbone(
            num_query_heads=2, num_key_value_heads=1, head_dim=8, **small
        )
        return model, _text()
    if name == "qwen3":
        model = models.Qwen3Backbone(
            num_query_heads=2, num_key_value_heads=1, head_dim=8, **small
        )
        return model, _text()
    if name == "t5":
        model = models.T5Backbone(num_heads=2, key_value_dim=8, **small)
        ones = np.ones((2, LENGTH), "int32")
        x = {
            "encoder_token_ids": _tokens(),
            "encoder_padding_mask": ones,
            "decoder_token_ids": _tokens(1),
            "decoder_padding_mask": ones,
        }
        return model, x
    model = models.ViTBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    return model, np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")


def _sines(y_true, y_pred):
    # Not sum(y ** 2): its gradient is parallel to a normalized output and
    # the final normalization cancels it (a gradient of roundoff only).
    outputs = keras.tree.flatten(y_pred)
    return sum(ops.sum(ops.sin(ops.cast(t, "float32"))) for t in outputs)


@pytest.mark.parametrize("name", ["bert", "gpt2", "gemma", "qwen3", "t5", "vit"])
def test_backbone_blocks_and_sublayers(name):
    model, x = _backbone(name)
    blocks = keras_actgrad.transformer_blocks(model)
    attention = keras_actgrad.attention_layers(model)
    mlp = keras_actgrad.mlp_layers(model)
    expected_blocks = 4 if name == "t5" else 2  # T5: encoder and decoder
    assert len(blocks) == expected_blocks
    assert len(attention) >= expected_blocks and len(mlp) >= expected_blocks
    selection = blocks + attention + mlp
    results = keras_actgrad.activation_gradients(
        model, x, loss=_sines, layers=selection
    )
    sites = {site.name: site.layer for site in select_layers(model, selection)}
    check(results, reference(model, x, None, _sines, sites), rtol=1e-4, atol=1e-4)
    assert all("call" not in vars(layer) for layer in sites.values())


def _causal_lm():
    backbone, _ = _backbone("gpt2")
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )
    x = _text()
    y = np.roll(x["token_ids"], -1, axis=1)
    return model, x, y


def test_causal_lm_in_place_then_generate_and_save(tmp_path):
    model, x, y = _causal_lm()
    prompt = {
        "token_ids": x["token_ids"],
        "padding_mask": np.array([[1] * 3 + [0] * 5] * 2, bool),
    }
    generated = model.generate(prompt, max_length=LENGTH, stop_token_ids=None)
    predictions = ops.convert_to_numpy(model.predict(x, verbose=0))
    selection = [
        "transformer_layer_*",
        "*/self_attention",
        "**/feedforward_output_dense",
    ]
    results = keras_actgrad.activation_gradients(model, x, y, layers=selection)
    assert list(results)[:3] == [
        "transformer_layer_0/self_attention",
        "transformer_layer_0/feedforward_output_dense",
        "transformer_layer_0",
    ]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sites = {site.name: site.layer for site in select_layers(model, selection)}
    check(results, reference(model, x, y, loss, sites), rtol=1e-4, atol=1e-4)
    # Left as it was: a CausalLM that generates the same tokens, predicts
    # the same logits bit for bit, and saves and reloads.
    assert type(model) is keras_hub.models.GPT2CausalLM
    again = model.generate(prompt, max_length=LENGTH, stop_token_ids=None)
    np.testing.assert_array_equal(again["token_ids"], generated["token_ids"])
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model.predict(x, verbose=0)), predictions
    )
    model.save(tmp_path / "lm.keras")
    reloaded = keras.saving.load_model(tmp_path / "lm.keras")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(reloaded.predict(x, verbose=0)), predictions
    )
    # The backbone can still be handed to a new task.
    keras_hub.models.GPT2CausalLM(backbone=model.backbone, preprocessor=None)


def test_text_classifier_in_place():
    backbone, x = _backbone("bert")
    model = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    y = np.array([0, 2])
    selection = keras_actgrad.transformer_blocks(model) + [
        "*/self_attention_layer/query"
    ]
    results = keras_actgrad.activation_gradients(model, x, y, layers=selection)
    assert "transformer_layer_1/self_attention_layer/query" in results
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sites = {site.name: site.layer for site in select_layers(model, selection)}
    check(results, reference(model, x, y, loss, sites), rtol=1e-4, atol=1e-4)


def test_callback_with_layers_in_fit_on_a_causal_lm():
    model, x, y = _causal_lm()
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y),
        layers=keras_actgrad.transformer_blocks(model),
        log_statistics=["grad_norm"],
    )
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    norms = history.history["actgrad/transformer_layer_1/grad_norm"]
    assert len(norms) == 2 and np.all(np.isfinite(norms))
    assert callback.probe_order == ["transformer_layer_0", "transformer_layer_1"]


@pytest.mark.parametrize("name", ["bert", "gemma", "t5"])
def test_insert_and_strip_probes_on_backbones(name):
    # These graphs hold Keras operations as nodes (`x + y`, `x[..., 0]`),
    # where `insert_probes` used to raise AttributeError.
    keras.utils.set_random_seed(0)
    model, x = _backbone(name)
    operations = [o for o in model.operations if not isinstance(o, keras.layers.Layer)]
    assert operations  # the construct `insert_probes` used to fail on
    want = keras.tree.map_structure(ops.convert_to_numpy, model(x))
    probed = keras_actgrad.insert_probes(model)
    probes = keras_actgrad.find_probes(probed)
    assert probes
    got = keras.tree.map_structure(ops.convert_to_numpy, probed(x))
    for expected, actual in zip(
        keras.tree.flatten(want), keras.tree.flatten(got), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)
    stripped = keras_actgrad.strip_probes(probed)
    assert keras_actgrad.find_probes(stripped) == []
    assert [layer.name for layer in stripped.layers] == [
        layer.name for layer in model.layers
    ]
    back = keras.tree.map_structure(ops.convert_to_numpy, stripped(x))
    for expected, actual in zip(
        keras.tree.flatten(want), keras.tree.flatten(back), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)


def test_monitor_in_place_on_a_causal_lm_first_step_equals_a_reference():
    # The monitor's first step is taken at the initial weights on the whole
    # (single) batch: its statistics are those of the patched-autodiff
    # reference there. Dropout 0: training mode is then inference mode.
    backbone, x = _backbone("gpt2", dropout=0.0)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    y = np.roll(x["token_ids"], -1, axis=1)
    selection = (
        keras_actgrad.transformer_blocks(model)
        + keras_actgrad.attention_layers(model)
        + keras_actgrad.mlp_layers(model)
    )
    sites = {site.name: site.layer for site in select_layers(model, selection)}
    expected = reference(model, x, y, loss, sites)
    monitor = keras_actgrad.GradientMonitor(layers=selection, statistics=None)
    model.fit(x, y, batch_size=2, epochs=3, verbose=0, callbacks=[monitor])
    assert [e["step"] for e in monitor.events] == [1, 2, 3]
    first = monitor.events[0]["statistics"]
    assert sorted(first) == sorted(expected)
    assert all("call" not in vars(layer) for layer in sites.values())
    for key, (activation, gradient) in expected.items():
        g = gradient.astype(np.float64)
        a = activation.astype(np.float64)
        values = first[key]
        np.testing.assert_allclose(
            [
                values["grad_norm"],
                values["grad_mean_abs"],
                values["grad_max_abs"],
                values["act_mean"],
            ],
            [np.linalg.norm(g), np.abs(g).mean(), np.abs(g).max(), a.mean()],
            rtol=2e-4,
            atol=1e-7,
            err_msg=key,
        )
    later = [
        e["statistics"][key]["grad_norm"]
        for e in monitor.events[1:]
        for key in e["statistics"]
    ]
    assert np.all(np.isfinite(later))
    assert np.isfinite(monitor.events[-1]["global_grad_norm"])
