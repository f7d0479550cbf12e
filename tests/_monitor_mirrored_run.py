"""`GradientMonitor` under `tf.distribute.MirroredStrategy` (prints one JSON line).

Run by tests/test_monitor_distribution.py in a fresh process: two logical
CPU devices must be configured before TensorFlow initialises. The same
model, weights and batches are trained three times: under the strategy with
the monitor, under the strategy without it, and on one device with it; the
reference is a single-device twin trained by hand (`_monitor_replay.py`).
"""

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _monitor_replay as replay  # noqa: E402


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {"replicas": strategy.num_replicas_in_sync}
    reference, reference_weights = replay.replay()

    single = replay.build()
    on_one_device = replay.monitor()
    replay.fit(single, [on_one_device])

    runs = {}
    for monitored in (True, False):
        with strategy.scope():
            model = replay.build()
        report["mirrored"] = type(model.trainable_variables[0].value).__name__
        monitor = replay.monitor()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = replay.fit(model, [monitor] if monitored else [])
        spikes = [str(w.message) for w in caught if "spike" in str(w.message)]
        runs[monitored] = (
            replay.state(model),
            history.history,
            monitor.events,
            spikes,
            model.get_weights(),
        )
    state, history, events, spikes, weights = runs[True]
    plain_state, plain_history, _, _, _ = runs[False]
    report["steps"] = [event["step"] for event in events]
    report["spike_steps"] = [event["step"] for event in events if event["spike"]]
    report["spike_warnings"] = spikes
    report["histogram_steps"] = [e["step"] for e in events if e["histograms"]]
    report["error_vs_one_device"] = replay.compare(events, on_one_device.events)
    report["error_vs_replay"] = replay.compare(events, reference)
    report["one_device_error_vs_replay"] = replay.compare(
        on_one_device.events, reference
    )
    report["bit_identical"] = len(state) == len(plain_state) and all(
        np.array_equal(a, b) for a, b in zip(state, plain_state, strict=True)
    )
    report["same_history"] = history == plain_history
    report["weights_vs_replay"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(weights, reference_weights, strict=True)
    )
    return report


if __name__ == "__main__":
    report = main()
    print(json.dumps(report))
