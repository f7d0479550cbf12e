"""`GradientMonitor` under `keras.distribution` on JAX (prints one JSON line).

Run by tests/test_monitor_distribution.py in a fresh process with two CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, set before
JAX initialises). Under `DataParallel` (the batch split over both devices)
and under `ModelParallel` (the Dense kernels of d1 and d2 sharded over both
devices by a `LayoutMap`; checked here), the same model, weights and
batches are trained with and without the monitor; the events are compared
with the monitor's on one device and with a single-device twin trained by
hand (`_monitor_replay.py`).
"""

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _monitor_replay as replay  # noqa: E402


def distributions():
    devices = jax.devices()
    yield "DataParallel", keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d1/kernel"] = (None, "model")
    layout_map["d2/kernel"] = ("model", None)
    yield (
        "ModelParallel",
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"),
    )


def sharded(model, name):
    sharding = model.get_layer(name).kernel.value.sharding
    return len(sharding.device_set) == 2 and not sharding.is_fully_replicated


def main():
    report = {"devices": len(jax.devices())}
    reference, reference_weights = replay.replay()
    single = replay.build()
    on_one_device = replay.monitor()
    replay.fit(single, [on_one_device])
    report["one_device_error_vs_replay"] = replay.compare(
        on_one_device.events, reference
    )
    for name, distribution in distributions():
        keras.distribution.set_distribution(distribution)
        try:
            runs = {}
            for monitored in (True, False):
                model = replay.build()
                kernels = {layer: sharded(model, layer) for layer in ("d1", "d2")}
                monitor = replay.monitor()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    history = replay.fit(model, [monitor] if monitored else [])
                runs[monitored] = (
                    replay.state(model),
                    history.history,
                    monitor.events,
                    [str(w.message) for w in caught if "spike" in str(w.message)],
                    model.get_weights(),
                )
        finally:
            keras.distribution.set_distribution(None)
        state, history, events, spikes, weights = runs[True]
        plain_state, plain_history, _, _, _ = runs[False]
        report[name] = {
            "sharded_kernels": kernels,
            "batch_layout": list(distribution.get_data_layout((16, 5)).axes),
            "steps": [event["step"] for event in events],
            "spike_steps": [event["step"] for event in events if event["spike"]],
            "spike_warnings": len(spikes),
            "histogram_steps": [e["step"] for e in events if e["histograms"]],
            "error_vs_one_device": replay.compare(events, on_one_device.events),
            "error_vs_replay": replay.compare(events, reference),
            "bit_identical": len(state) == len(plain_state)
            and all(
                np.array_equal(a, b) for a, b in zip(state, plain_state, strict=True)
            ),
            "same_history": history == plain_history,
            "weights_vs_replay": max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(weights, reference_weights, strict=True)
            ),
        }
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
