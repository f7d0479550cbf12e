"""A small residual CNN on 8x8 digits, probed by layer type.

A Functional model with two residual blocks (Conv2D, BatchNormalization,
ReLU, Conv2D, BatchNormalization, `Add` with the skip connection).
`insert_probes(model, layers=[Conv2D, Add])` puts a `GradientProbe` after
every convolution and after every residual sum: the probes on the residual
stream (the `Add`s) show the gradient the skip connections carry back,
those after the convolutions what each branch receives.

    python examples/functional_resnet.py [--epochs 4] [--log-dir logs/resnet]

`ACTGRAD_EXAMPLE_QUICK=1` runs fewer epochs on 512 examples (used by the
tests).
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_actgrad  # noqa: E402

QUICK = os.environ.get("ACTGRAD_EXAMPLE_QUICK") == "1"
EXAMPLES = 512 if QUICK else None  # all 1797 digits


def residual_block(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    h = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv1")(x)
    h = keras.layers.BatchNormalization(name=f"{name}_bn1")(h)
    h = keras.layers.Activation("relu", name=f"{name}_relu1")(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv2")(h)
    h = keras.layers.BatchNormalization(name=f"{name}_bn2")(h)
    h = keras.layers.Add(name=f"{name}_add")([x, h])
    return keras.layers.Activation("relu", name=f"{name}_out")(h)


def build() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="digit")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(
        inputs
    )
    x = residual_block(x, 16, "block1")
    x = residual_block(x, 16, "block2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_resnet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2 if QUICK else 4)
    parser.add_argument("--log-dir", default=os.path.join("logs", "resnet"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (n, 8, 8, 1)
    y = digits.target.astype("int32")
    x, y = x[:EXAMPLES], y[:EXAMPLES]
    model = build()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # Probes by layer type: after every Conv2D and every residual Add.
    model = keras_actgrad.insert_probes(
        model, layers=[keras.layers.Conv2D, keras.layers.Add]
    )
    probes = [probe.name for probe in keras_actgrad.find_probes(model)]
    print(f"{len(probes)} probes: {', '.join(probes)}")

    shutil.rmtree(args.log_dir, ignore_errors=True)
    callback = keras_actgrad.ActivationGradientCallback(
        (x[:128], y[:128]), log_dir=args.log_dir
    )
    history = model.fit(
        x, y, epochs=args.epochs, batch_size=64, callbacks=[callback], verbose=0
    )
    print(
        f"training accuracy after {args.epochs} epochs: "
        f"{history.history['accuracy'][-1]:.3f}"
    )
    print(keras_actgrad.load_report(args.log_dir).table())


if __name__ == "__main__":
    main()
