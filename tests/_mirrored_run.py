"""Run by tests/test_distribution.py in a fresh process (prints one JSON line).

Two logical CPU devices must be configured before TensorFlow initialises its
devices, which a pytest process has usually done already; hence a subprocess.
The model is built and compiled under `tf.distribute.MirroredStrategy`; every
number is compared with a single-device copy holding the same weights,
differentiated by a hand-split `tf.GradientTape` (not the code under test).
"""

import json
import os
import sys
import tempfile
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_actgrad  # noqa: E402


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(12, activation="tanh", name="d1")(inputs)
    h = keras_actgrad.GradientProbe(name="hidden")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(6, activation="tanh", name="d2")(h)
    h = keras_actgrad.GradientProbe(name="features")(h)
    outputs = keras.layers.Dense(2, name="d3")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def hand_split(model, x, y):
    """Gradients at the two probes of a single-device model, by a split tape."""
    d1, bn, d2, d3 = (model.get_layer(n) for n in ("d1", "bn", "d2", "d3"))
    with tf.GradientTape() as tape:
        h1 = d1(x)
        tape.watch(h1)
        h2 = d2(bn(h1, training=False))
        tape.watch(h2)
        loss = tf.reduce_mean(tf.square(d3(h2) - y))
    g1, g2 = tape.gradient(loss, [h1, h2])
    return {"hidden": g1.numpy(), "features": g2.numpy()}


def max_error(results, reference):
    return max(
        float(np.max(np.abs(results[name].gradient - reference[name])))
        for name in reference
    )


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {"replicas": strategy.num_replicas_in_sync}
    with strategy.scope():
        model = build()
    report["mirrored"] = type(model.get_layer("d1").kernel.value).__name__
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    # An odd probe batch: it cannot be split evenly over the two replicas.
    px, py = x[:21], y[:21]

    single = build()
    single.set_weights(model.get_weights())
    reference = hand_split(single, px, py)
    report["reference_max"] = max(float(np.abs(g).max()) for g in reference.values())

    outside = keras_actgrad.activation_gradients(model, px, py)
    report["outside_error"] = max_error(outside, reference)
    with strategy.scope():
        inside = keras_actgrad.activation_gradients(model, px, py)
    report["inside_error"] = max_error(inside, reference)

    try:
        strategy.run(lambda: keras_actgrad.activation_gradients(model, px, py))
        report["replica_context_error"] = None
    except RuntimeError as error:
        report["replica_context_error"] = str(error)

    log_dir = tempfile.mkdtemp()
    callback = keras_actgrad.ActivationGradientCallback(
        (px, py),
        log_dir=log_dir,
        statistics=["grad_norm"],
        log_statistics=["grad_norm"],
        histograms=False,
    )
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    report["trained"] = bool(
        not np.allclose(model.get_layer("d1").kernel.numpy(), single.get_weights()[0])
    )
    single.set_weights(model.get_weights())
    reference = hand_split(single, px, py)
    report["callback"] = {
        name: [
            history.history[f"actgrad/{name}/grad_norm"][-1],
            float(np.sqrt(np.sum(reference[name].astype(np.float64) ** 2))),
        ]
        for name in reference
    }
    report["event_files"] = sorted(os.listdir(os.path.join(log_dir, "actgrad")))
    return report


if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = main()
    # Our warnings only (third-party deprecations are not ours to fail on).
    report["our_warnings"] = [
        str(w.message) for w in record if "keras_actgrad" in w.filename
    ]
    print(json.dumps(report))
