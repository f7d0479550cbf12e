"""A subclassed model with its own probes, and a saliency map from them.

`insert_probes` cannot rewrite a subclassed model (its forward pass is
Python code), so the model creates `GradientProbe` layers in `__init__` and
calls them in `call()`: one on the input pixels, one on each hidden layer.
It trains with `ActivationGradientCallback` as any model would.

Then `activation_gradients` with a custom loss, minus the summed score of
class k, gives at the input probe d(-score_k)/d(pixels): its negative is a
saliency map, the pixels that raise the model's score for k.

    python examples/subclassed_model.py [--epochs 10] [--log-dir logs/subclassed]

`ACTGRAD_EXAMPLE_QUICK=1` runs fewer epochs on 512 examples (used by the
tests).
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_actgrad  # noqa: E402

QUICK = os.environ.get("ACTGRAD_EXAMPLE_QUICK") == "1"
EXAMPLES = 512 if QUICK else None  # all 1797 digits


class ProbedMLP(keras.Model):
    """An MLP with a probe on its input and after each hidden layer."""

    def __init__(self, units: int = 64, classes: int = 10, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.pixels_probe = keras_actgrad.GradientProbe(name="pixels")
        self.hidden1 = keras.layers.Dense(units, activation="relu")
        self.hidden1_probe = keras_actgrad.GradientProbe(name="hidden1")
        self.hidden2 = keras.layers.Dense(units, activation="relu")
        self.hidden2_probe = keras_actgrad.GradientProbe(name="hidden2")
        self.logits = keras.layers.Dense(classes)

    def call(self, inputs: keras.KerasTensor) -> keras.KerasTensor:
        x = self.pixels_probe(inputs)
        x = self.hidden1_probe(self.hidden1(x))
        x = self.hidden2_probe(self.hidden2(x))
        return self.logits(x)


def shade(values: np.ndarray) -> list[str]:
    """An 8x8 map as text, darker characters for larger values."""
    ramp = " .:-=+*#%@"
    scaled = values / values.max() if values.max() > 0 else values
    return [
        "".join(ramp[int(round(v * (len(ramp) - 1)))] * 2 for v in row)
        for row in scaled
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3 if QUICK else 10)
    parser.add_argument("--log-dir", default=os.path.join("logs", "subclassed"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x, y = x[:EXAMPLES], y[:EXAMPLES]
    model = ProbedMLP(name="probed_mlp")
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model(x[:1])  # build the weights before the callback's first probe pass

    shutil.rmtree(args.log_dir, ignore_errors=True)
    callback = keras_actgrad.ActivationGradientCallback(
        (x[:256], y[:256]), log_dir=args.log_dir
    )
    history = model.fit(
        x, y, epochs=args.epochs, batch_size=64, callbacks=[callback], verbose=0
    )
    print(
        f"training accuracy after {args.epochs} epochs: "
        f"{history.history['accuracy'][-1]:.3f}"
    )
    print(keras_actgrad.load_report(args.log_dir).table())
    print()

    # Saliency for class k over the examples of class k: the loss is minus
    # the summed class score, so the gradient at the pixels is -d score/dx.
    k = 3
    examples = x[y == k][:32]

    def minus_score(
        y_true: keras.KerasTensor, y_pred: keras.KerasTensor
    ) -> keras.KerasTensor:
        return -keras.ops.sum(y_pred[:, k])

    results = keras_actgrad.activation_gradients(model, examples, loss=minus_score)
    saliency = -results["pixels"].gradient  # (32, 64): d score_k / d pixel
    # Where brightening a pixel raises the score of class k, on average.
    raises = np.maximum(saliency.mean(axis=0), 0.0).reshape(8, 8)
    mean_digit = examples.mean(axis=0).reshape(8, 8)
    print(
        f"saliency for class {k} (mean d score_{k} / d pixel over "
        f"{len(examples)} examples, positive part), next to the mean digit {k}:"
    )
    for left, right in zip(shade(raises), shade(mean_digit), strict=True):
        print(f"  {left}    {right}")
    top = np.argsort(raises.ravel())[::-1][:3]
    print(
        "most salient pixels (row, column): "
        + ", ".join(f"({i // 8}, {i % 8})" for i in top)
    )


if __name__ == "__main__":
    main()
