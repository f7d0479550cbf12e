"""Models and data shared by the cross-backend tests (not a test module).

`tests/test_backends.py` builds these models under TensorFlow, saves their
weights and data, and runs this file in a subprocess per backend:

    KERAS_BACKEND=jax python tests/backend_cases.py compute <dir>

which loads the weights and data, runs the probe pass on every case and
writes `<dir>/results_<backend>.npz`. Every layer is named, so probe names
and variable paths are the same on every backend.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

import keras_actgrad
from keras_actgrad import GradientProbe
from keras_actgrad._backends.base import PassConfig
from keras_actgrad._engine import Unreduced, get_engine


def mlp_batchnorm() -> keras.Model:
    inputs = keras.Input((6,), name="x")
    h = GradientProbe(name="mlp_input")(inputs)
    h = keras.layers.Dense(16, kernel_regularizer="l2", name="mlp_dense1")(h)
    h = keras.layers.BatchNormalization(name="mlp_bn")(h)
    h = keras.layers.ReLU(name="mlp_relu")(h)
    h = GradientProbe(name="mlp_h1")(h)
    h = keras.layers.Dense(8, activation="tanh", name="mlp_dense2")(h)
    h = GradientProbe(name="mlp_h2")(h)
    outputs = keras.layers.Dense(3, name="mlp_out")(h)
    model = keras.Model(inputs, outputs, name="mlp_batchnorm")
    model.compile(loss="mse")
    return model


def residual_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    c1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="cnn_c1")(
        inputs
    )
    p1 = GradientProbe(name="cnn_c1_probe")(c1)
    c2 = keras.layers.Conv2D(4, 3, padding="same", name="cnn_c2")(p1)
    c2 = GradientProbe(name="cnn_c2_probe")(c2)
    # The skip branch reads c1 directly: it bypasses cnn_c1_probe.
    h = keras.layers.Add(name="cnn_add")([c2, c1])
    h = keras.layers.ReLU(name="cnn_relu")(h)
    h = GradientProbe(name="cnn_res_probe")(h)
    h = keras.layers.GlobalAveragePooling2D(name="cnn_pool")(h)
    outputs = keras.layers.Dense(4, name="cnn_logits")(h)
    model = keras.Model(inputs, outputs, name="residual_cnn")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def multi_io() -> keras.Model:
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    shared = GradientProbe(name="mimo_shared")  # called twice: mimo_shared@1
    ha = shared(keras.layers.Dense(4, activation="relu", name="mimo_da")(a))
    hb = shared(keras.layers.Dense(4, activation="relu", name="mimo_db")(b))
    h = keras.layers.Concatenate(name="mimo_cat")([ha, hb])
    h = keras.layers.Dense(6, activation="sigmoid", name="mimo_dense")(h)
    h = GradientProbe(name="mimo_h")(h)
    out1 = keras.layers.Dense(2, name="out1")(h)
    out2 = keras.layers.Dense(1, activation="sigmoid", name="out2")(h)
    # An output without a loss: its probe and weights get no gradient (None).
    aux = keras.layers.Dense(3, activation="relu", name="mimo_aux_dense")(a)
    aux = keras.layers.Dense(1, name="aux")(GradientProbe(name="mimo_aux_probe")(aux))
    model = keras.Model(
        {"a": a, "b": b}, {"out1": out1, "out2": out2, "aux": aux}, name="mimo"
    )
    model.compile(
        loss={"out1": "mse", "out2": "binary_crossentropy"},
        loss_weights={"out1": 1.0, "out2": 0.5},
    )
    return model


def nested() -> keras.Model:
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="inner_dense1"),
            GradientProbe(name="inner_probe"),
            keras.layers.Dense(4, name="inner_dense2"),
        ],
        name="inner",
    )
    inputs = keras.Input((5,), name="x")
    h = keras.layers.Dense(6, activation="elu", name="outer_dense")(inputs)
    h = GradientProbe(name="outer_probe")(h)
    h = inner(h)
    h = GradientProbe(name="after_inner_probe")(h)
    outputs = keras.layers.Dense(1, name="outer_out")(h)
    model = keras.Model(inputs, outputs, name="nested")
    model.compile(loss="mae")
    return model


class Subclassed(keras.Model):
    """A subclassed model with an activity regularizer and Python control flow."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense1 = keras.layers.Dense(
            8, activation="relu", activity_regularizer="l2", name="sub_dense1"
        )
        self.probe1 = GradientProbe(name="sub_probe1")
        self.norm = keras.layers.LayerNormalization(name="sub_norm")
        self.dense2 = keras.layers.Dense(8, activation="gelu", name="sub_dense2")
        self.probe2 = GradientProbe(name="sub_probe2")
        self.head = keras.layers.Dense(2, name="sub_head")

    def call(self, inputs: Any, training: bool = False) -> Any:
        h = self.probe1(self.dense1(inputs))
        for _ in range(2):
            h = h + self.dense2(self.norm(h))
        return self.head(self.probe2(h))


def subclassed() -> keras.Model:
    model = Subclassed(name="subclassed")
    model(np.zeros((1, 4), "float32"))
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


BUILDERS = {
    "mlp_batchnorm": mlp_batchnorm,
    "residual_cnn": residual_cnn,
    "multi_io": multi_io,
    "nested": nested,
    "subclassed": subclassed,
}


def make_data(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, labels and sample weights for a case, as flat named arrays."""
    rng = np.random.default_rng(seed)
    n = 6

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(size=(n, *shape)).astype("float32")

    if name == "mlp_batchnorm":
        return {
            "x": normal(6),
            "y": normal(3),
            "sample_weight": rng.uniform(0.5, 2, n).astype("float32"),
        }
    if name == "residual_cnn":
        return {"x": normal(8, 8, 3), "y": rng.integers(0, 4, n).astype("int32")}
    if name == "multi_io":
        return {
            "x/a": normal(5),
            "x/b": normal(3),
            "y/out1": normal(2),
            "y/out2": rng.integers(0, 2, (n, 1)).astype("float32"),
        }
    if name == "nested":
        return {"x": normal(5), "y": normal(1)}
    if name == "subclassed":
        labels = rng.integers(0, 2, n)
        return {"x": normal(4), "y": np.eye(2, dtype="float32")[labels]}
    raise ValueError(f"Unknown case: {name}")


def unpack(data: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
    """(x, y, sample_weight) from the flat arrays of `make_data`."""
    parts: dict[str, Any] = {}
    for key, value in data.items():
        if "/" in key:
            group, field = key.split("/")
            parts.setdefault(group, {})[field] = value
        else:
            parts[key] = value
    return parts["x"], parts.get("y"), parts.get("sample_weight")


def compute(model: keras.Model, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Activations, gradients and weight gradients of every probe pass."""
    x, y, sample_weight = unpack(data)
    out: dict[str, np.ndarray] = {}
    for training in (False, True):
        results = keras_actgrad.activation_gradients(
            model, x, y, sample_weight=sample_weight, training=training
        )
        for probe, result in results.items():
            out[f"{training}/{probe}/activation"] = np.asarray(result.activation)
            out[f"{training}/{probe}/gradient"] = (
                np.full((), np.nan) if result.gradient is None else result.gradient
            )
    engine = get_engine(model)
    config = PassConfig(
        loss="model", training=False, weight_gradients=True, reducer=Unreduced()
    )
    full = engine.run(engine.prepare(x, y, sample_weight), config).outputs
    out["loss"] = full["loss"]
    for path, gradient in full["weight_gradients"].items():
        out[f"weights/{path}"] = np.full((), np.nan) if gradient is None else gradient
    return out


def main(directory: str) -> None:
    folder = Path(directory)
    backend = keras.backend.backend()
    arrays: dict[str, np.ndarray] = {}
    for name, builder in BUILDERS.items():
        model = builder()
        model.load_weights(folder / f"{name}.weights.h5")
        data = dict(np.load(folder / f"{name}.npz"))
        for key, value in compute(model, data).items():
            arrays[f"{name}:{key}"] = value
    np.savez(folder / f"results_{backend}.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[2])
