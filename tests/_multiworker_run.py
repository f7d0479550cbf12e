"""One worker of a two-worker MultiWorkerMirroredStrategy run (prints JSON).

Run by tests/test_distribution.py as two processes on localhost:
`python _multiworker_run.py <task index> <port0>,<port1> <log_dir>`.
"""

import json
import os
import sys
import warnings

index, ports, log_dir = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_actgrad  # noqa: E402


def main():
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh", name="d1"),
                keras_actgrad.GradientProbe(name="hidden"),
                keras.layers.Dense(1, name="d2"),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)  # the same probe batch on both workers
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y),
        log_dir=log_dir,
        statistics=["grad_norm"],
        log_statistics=["grad_norm"],
        histograms=False,
    )
    # Keras 3's `fit` does not run under MultiWorkerMirroredStrategy
    # (keras-team/keras#20585); a custom training loop drives the callback
    # through the hooks `fit` calls.
    callback.set_model(model)
    callback.on_train_begin()
    logs = {}
    callback.on_epoch_begin(0)
    callback.on_epoch_end(0, logs)
    callback.on_train_end()
    with tf.GradientTape() as tape:  # hand-split reference
        h = model.get_layer("d1")(x)
        tape.watch(h)
        loss = tf.reduce_mean(tf.square(model.get_layer("d2")(h) - y))
    reference = tape.gradient(loss, h).numpy().astype("float64")
    # The monitor cannot combine the workers' shares of a batch: refused.
    monitor = keras_actgrad.GradientMonitor()
    monitor.set_model(model)
    try:
        monitor.on_train_begin()
        monitor_error = None
    except ValueError as error:
        monitor_error = str(error)
    return {
        "monitor_error": monitor_error,
        "should_save_summary": strategy.extended.should_save_summary,
        "replicas": strategy.num_replicas_in_sync,
        "grad_norm": logs["actgrad/hidden/grad_norm"],
        "reference_grad_norm": float(np.sqrt(np.sum(reference**2))),
        "wrote": os.path.isdir(os.path.join(log_dir, "actgrad")),
        "events": len(callback.events),
    }


if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = main()
    # Our warnings only (third-party deprecations are not ours to fail on).
    report["our_warnings"] = [
        str(w.message) for w in record if "keras_actgrad" in w.filename
    ]
    print(json.dumps(report))
