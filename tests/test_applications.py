"""keras.applications models: `insert_probes` / `strip_probes` and in-place
measurement, against the eager zero-perturbation reference.

Random weights, the smallest input each model allows, batch 2. Two models
cover the graph constructs the others are built from (the rest repeat
them, so they are left out to keep CI time sane; measured 2026-12 on 2
loaded cores: EfficientNetB0 1.7e-6, DenseNet121 7.2e-7 relative error,
builds of 60-100 s):
- MobileNetV3Small: Keras *operations* as graph nodes (`x + 3`, `x * y` in
  hard-swish and squeeze-excite: `Add`, `Multiply` operations), residual
  `Add` layers, depthwise convolutions, BatchNormalization, Reshape.
- ConvNeXtTiny: nested Sequential models (stem, downsampling), a custom
  layer (`LayerScale`), an `Add` operation node, LayerNormalization, GELU.
  In the PyTorch suite only (the cheapest): MobileNetV3Small covers the
  backends' numerics, ConvNeXtTiny adds graph constructs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import keras_actgrad
from keras_actgrad._layers import select_layers
from tests.inplace_reference import check, reference

BUILDERS = {
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=5, include_preprocessing=False
    ),
    "ConvNeXtTiny": lambda: keras.applications.ConvNeXtTiny(
        input_shape=(32, 32, 3), weights=None, classes=5
    ),
}


def _graph_layer_with_weights(model):
    top = set(map(id, model.layers))
    return lambda layer: (
        id(layer) in top and bool(layer.weights) and not isinstance(layer, keras.Model)
    )


@pytest.mark.parametrize(
    "name",
    [
        "MobileNetV3Small",
        # Its constructs (nested Sequential models, a custom layer) are the
        # graph's, which `insert_probes` and the layer selection handle the
        # same on every backend: 140-170 s of TF and JAX CI time spared.
        pytest.param(
            "ConvNeXtTiny",
            marks=pytest.mark.one_backend("torch", reason="graph constructs"),
        ),
    ],
)
def test_application(name):
    model = BUILDERS[name]()
    operations = [o for o in model.operations if not isinstance(o, keras.layers.Layer)]
    if name == "MobileNetV3Small":
        assert operations  # the construct `insert_probes` used to fail on
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = np.eye(5, dtype="float32")[[1, 3]]
    loss = keras.losses.CategoricalCrossentropy()

    probed = keras_actgrad.insert_probes(model)
    predictions = ops.convert_to_numpy(model(x))
    np.testing.assert_array_equal(ops.convert_to_numpy(probed(x)), predictions)
    stripped = keras_actgrad.strip_probes(probed)
    assert keras_actgrad.find_probes(stripped) == []
    np.testing.assert_array_equal(ops.convert_to_numpy(stripped(x)), predictions)

    selection = _graph_layer_with_weights(model)
    in_place = keras_actgrad.activation_gradients(
        model, x, y, loss=loss, layers=selection
    )
    sites = {site.name: site.layer for site in select_layers(model, selection)}
    check(in_place, reference(model, x, y, loss, sites), rtol=1e-4, atol=1e-5)
    by_probe = keras_actgrad.activation_gradients(probed, x, y, loss=loss)
    for key, result in in_place.items():
        probe = by_probe[f"{sites[key].name}_probe"]
        scale = float(np.abs(result.gradient).max())
        np.testing.assert_allclose(
            probe.gradient, result.gradient, rtol=1e-4, atol=1e-5 * scale
        )
