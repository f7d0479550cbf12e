"""Vanishing gradients, caught: a deep sigmoid MLP next to ReLU + BatchNorm.

Two MLPs of the same depth on scikit-learn's bundled digits (offline): one
with sigmoid activations, whose derivative is at most 1/4, so that here the
gradient shrinks about 4-fold at every layer on its way back to the input,
and one with ReLU and BatchNormalization. `ActivationGradientCallback`
warns about the first (vanishing: the first probe's `grad_norm` is below
1e-4 times the last probe's) and not about the second; the two reports show
where the gradient dies.

    python examples/vanishing_gradients.py [--depth 10] [--epochs 4]
        [--log-dir logs/vanishing]

`ACTGRAD_EXAMPLE_QUICK=1` runs fewer epochs on 512 examples (used by the
tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_actgrad  # noqa: E402

QUICK = os.environ.get("ACTGRAD_EXAMPLE_QUICK") == "1"
EXAMPLES = 512 if QUICK else None  # all 1797 digits


def build(kind: str, depth: int, width: int) -> keras.Model:
    layers: list[keras.layers.Layer] = [keras.Input((64,))]
    for i in range(1, depth + 1):
        if kind == "sigmoid":
            layers.append(
                keras.layers.Dense(width, activation="sigmoid", name=f"hidden{i}")
            )
        else:
            layers.append(keras.layers.Dense(width, use_bias=False, name=f"hidden{i}"))
            layers.append(keras.layers.BatchNormalization(name=f"bn{i}"))
            layers.append(keras.layers.Activation("relu", name=f"relu{i}"))
    layers.append(keras.layers.Dense(10, name="logits"))
    model = keras.Sequential(layers, name=f"deep_{kind}")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # Probes after the Dense layers only: one per depth level.
    return keras_actgrad.insert_probes(model, layers=keras.layers.Dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2 if QUICK else 4)
    parser.add_argument("--log-dir", default=os.path.join("logs", "vanishing"))
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x, y = x[:EXAMPLES], y[:EXAMPLES]
    for kind in ("sigmoid", "relu_batchnorm"):
        keras.utils.set_random_seed(0)
        model = build(kind, args.depth, args.width)
        log_dir = os.path.join(args.log_dir, kind)
        shutil.rmtree(log_dir, ignore_errors=True)
        callback = keras_actgrad.ActivationGradientCallback(
            (x[:256], y[:256]), log_dir=log_dir
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(
                x,
                y,
                epochs=args.epochs,
                batch_size=32,
                callbacks=[callback],
                verbose=0,
            )
        alerts = [str(w.message) for w in caught if "vanish" in str(w.message).lower()]
        accuracy = history.history["accuracy"][-1]
        print(
            f"== {model.name}: {args.depth} hidden layers, "
            f"training accuracy {accuracy:.3f}"
        )
        if alerts:
            print(f"vanishing alert: {alerts[0]}")
        else:
            print("no vanishing alert")
        print(keras_actgrad.load_report(log_dir).table())
        print()
    print(f"Compare the two runs side by side: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
