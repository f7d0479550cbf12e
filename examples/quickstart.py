"""Quickstart: watch the gradient at every layer of an MLP while it trains.

An MLP on scikit-learn's bundled 8x8 digits (offline), a `GradientProbe`
after every Dense layer (`insert_probes`), and `ActivationGradientCallback`
logging each probe's gradient statistics every epoch to `logs` and to
TensorBoard. At the end it prints the per-probe report (what
`keras-actgrad report LOG_DIR` prints) and the command to open TensorBoard.

    python examples/quickstart.py [--log-dir logs/quickstart] [--epochs 10]
        [--png report.png]

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


def load_data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x, y = x[:EXAMPLES], y[:EXAMPLES]
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default=os.path.join("logs", "quickstart"))
    parser.add_argument("--epochs", type=int, default=3 if QUICK else 10)
    parser.add_argument("--png", help="also save the report's heatmap here")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    x, y = load_data()
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_mlp",
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # A GradientProbe after every layer with weights: dense_probe, ...
    model = keras_actgrad.insert_probes(model)

    shutil.rmtree(args.log_dir, ignore_errors=True)  # one run per log dir
    callbacks = [
        # A fixed probe batch, so that epochs are comparable.
        # The grad_norm bar chart per epoch in TensorBoard's Images tab.
        keras_actgrad.ActivationGradientCallback(
            (x[:256], y[:256]), log_dir=args.log_dir, profile_images=True
        ),
        keras.callbacks.TensorBoard(log_dir=args.log_dir),
    ]
    history = model.fit(
        x,
        y,
        epochs=args.epochs,
        batch_size=64,
        validation_split=0.2,
        callbacks=callbacks,
        verbose=0,
    )
    accuracy = history.history["val_accuracy"][-1]
    print(f"trained {args.epochs} epochs, validation accuracy {accuracy:.3f}")
    # The progress bar's one actgrad value: first probe's grad_norm / last's.
    last = history.history["actgrad/grad_norm_ratio"][-1]
    print(f"logs['actgrad/grad_norm_ratio'] at the last epoch: {last:.4g}")
    print()

    report = keras_actgrad.load_report(args.log_dir)
    print(report.table())
    print()
    if args.png:
        report.plot(args.png)
        print(f"heatmap saved to {args.png}")
    print("The same table from the command line:")
    print(f"  keras-actgrad report {args.log_dir} --png report.png")
    print("See it in TensorBoard (Scalars, Histograms and Images tabs):")
    print(f"  tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
