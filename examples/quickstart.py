"""Quickstart: probe an MLP on scikit-learn's bundled digits (offline, seconds)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_actgrad  # noqa: E402


def main() -> None:
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model = keras_actgrad.insert_probes(model)
    model.fit(x, y, epochs=int(os.environ.get("ACTGRAD_EPOCHS", "3")), verbose=0)
    results = keras_actgrad.activation_gradients(model, x[:256], y[:256])
    print(f"{'probe':<16}{'grad_norm':>12}")
    for name, result in results.items():
        print(f"{name:<16}{np.linalg.norm(result.gradient):>12.4g}")


if __name__ == "__main__":
    main()
