"""One JAX process of a multi-process run (see tests/test_multihost.py).

    python _multihost_run.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR SCENARIO

Every process runs this same script (as on a cluster), joins the others
with `jax.distributed.initialize` on 127.0.0.1:PORT (JAX's CPU collectives,
Gloo), and writes what it measured to OUT_DIR/<scenario>-<id>.npz.

Scenarios:
- "values": under `DataParallel` and a `ModelParallel` mesh over the
  processes, the probed MLP of `_monitor_replay.py` trains on this
  process's share of each global batch, with a `GradientMonitor` and two
  `ActivationGradientCallback`s (the process's own share of the probe
  batch; the same whole batch on each, in chunks), then
  `activation_gradients` (share, whole). Then the probe batches that must
  be refused before the first batch trains, and `on_nonfinite="stop"`
  with a NaN in one process's share only.
- "raise": process 1 raises in a callback of its own at the third step;
  the others go on into the next step's collectives.
"""

import json
import os
import sys
import time
import warnings

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def initialize(process_id, num_processes, port, timeouts=None):
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        **(timeouts or {}),
    )


import _multihost_common as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_actgrad  # noqa: E402


def distributions():
    """Two processes of two devices: `DataParallel` over the four devices and
    a `ModelParallel` mesh with a process per row (the batch split over the
    processes, the kernels of d1 and d2 over each one's two devices). Four
    processes of one device: a `ModelParallel` mesh of 2 x 2 processes (the
    kernels split over two processes; processes 0 and 1 hold the same half
    of the batch, 2 and 3 the other)."""
    devices = jax.devices()
    if jax.process_count() == 2:
        yield (
            "DataParallel",
            keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False),
        )
    mesh = keras.distribution.DeviceMesh(
        (2, len(devices) // 2), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d1/kernel"] = (None, "model")
    layout_map["d2/kernel"] = ("model", None)
    yield (
        "ModelParallel",
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
        ),
    )


def own_rows(size):
    """The rows of a batch of `size` that this process's devices hold."""
    layout = keras.distribution.distribution().get_data_layout((size, common.D))
    rows = set()
    for device, index in layout.backend_layout.devices_indices_map(
        (size, common.D)
    ).items():
        if device.process_index == jax.process_index():
            rows.update(range(*index[0].indices(size)))
    return np.asarray(sorted(rows))


def shares(rows):
    """This process's share of every global training batch, in order."""
    index = np.concatenate(
        [k * common.BATCH + rows for k in range(common.N // common.BATCH)]
    )
    return common.X[index], common.Y[index], common.SAMPLE_WEIGHT[index]


def sharded(model, name):
    sharding = model.get_layer(name).kernel.value.sharding
    return not sharding.is_fully_replicated


def run_values(out, pid):
    results = {}
    report = {}
    for name, distribution in distributions():
        keras.distribution.set_distribution(distribution)
        model = common.build()
        rows = own_rows(common.BATCH)
        probe_rows = own_rows(len(common.PROBE_X))
        x, y, w = shares(rows)
        monitor, callback, whole = common.callbacks(
            (common.PROBE_X[probe_rows], common.PROBE_Y[probe_rows]),
            os.path.join(out, name),
        )
        # The same whole batch on each process, in chunks: once.
        full = name == "DataParallel"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(
                x,
                y,
                sample_weight=w,
                batch_size=len(rows),
                epochs=common.EPOCHS,
                shuffle=False,
                verbose=0,
                callbacks=[monitor, callback, whole] if full else [monitor, callback],
            )
            share = keras_actgrad.activation_gradients(
                model, common.PROBE_X[probe_rows], common.PROBE_Y[probe_rows]
            )
            chunked = (
                keras_actgrad.activation_gradients(
                    model, common.PROBE_X, common.PROBE_Y, probe_batch_size=8
                )
                if full
                else None
            )
        results.update(
            common.flatten(
                name, monitor, callback, whole if full else None, share, chunked, model
            )
        )
        report[name] = {
            "rows": rows.tolist(),
            "sharded": [sharded(model, layer) for layer in ("d1", "d2")],
            # Ours (Keras's own DeprecationWarnings left out).
            "warnings": sorted(
                str(w.message) for w in caught if issubclass(w.category, UserWarning)
            ),
            "writer_pid": os.getpid(),
        }
    count = jax.process_count()
    if count != 2:
        # Processes 0 and 1 hold the same half of the batch: different
        # probe batches on them are no shares.
        report["refusals"] = refusals(
            {"replicas": (common.PROBE_X[4 * pid : 4 * pid + 4], None)}
        )
        return finish(out, pid, results, report)
    # Probe batches that are neither a share nor the same whole batch.
    keras.distribution.set_distribution(dict(distributions())["DataParallel"])
    report["refusals"] = refusals(
        {
            # Shares of different sizes.
            "sizes": (common.PROBE_X[: 4 + pid], common.PROBE_Y[: 4 + pid]),
            # A different feature width on the last process.
            "shapes": (
                np.zeros((4, common.D + (pid == count - 1)), "float32"),
                common.PROBE_Y[:4],
            ),
        }
    )
    stop(pid, report)
    report["undistributed"] = undistributed()
    return finish(out, pid, results, report)


def undistributed():
    """Several processes without a distribution: each would train alone."""
    keras.distribution.set_distribution(None)
    found = {}
    for name, callback in (
        ("monitor", keras_actgrad.GradientMonitor()),
        ("callback", keras_actgrad.ActivationGradientCallback(common.PROBE_X[:4])),
    ):
        model = common.build()
        try:
            model.fit(common.X[:8], common.Y[:8], verbose=0, callbacks=[callback])
            found[name] = None
        except ValueError as error:
            found[name] = str(error)
    return found


def refusals(cases):
    """What `fit` raised with each probe batch, and how many steps it trained."""
    found = {}
    for case, probe in cases.items():
        model = common.build()
        trained = []
        refused = keras_actgrad.ActivationGradientCallback(probe)
        step = keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs, seen=trained: seen.append(batch)
        )
        x, y, _ = shares(own_rows(common.BATCH))
        try:
            model.fit(
                x,
                y,
                batch_size=len(x) // (common.N // common.BATCH),
                epochs=1,
                verbose=0,
                callbacks=[refused, step],
            )
            found[case] = None
        except ValueError as error:
            found[case] = {"message": str(error), "trained": len(trained)}
    return found


def stop(pid, report):
    """on_nonfinite="stop": a NaN in the last process's share of step 3 only."""
    count = jax.process_count()
    model = common.build()
    rows = own_rows(common.BATCH)
    x, y, w = shares(rows)
    if pid == count - 1:
        x = x.copy()
        x[2 * len(rows)] = np.nan
    monitor = keras_actgrad.GradientMonitor(on_nonfinite="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=len(rows),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[monitor],
        )
    report["stop"] = {
        "steps": [event["step"] for event in monitor.events],
        "iterations": int(model.optimizer.iterations.numpy()),
        "warnings": sum("Non-finite" in str(w.message) for w in caught),
    }


def finish(out, pid, results, report):
    keras.distribution.set_distribution(None)
    np.savez(os.path.join(out, f"values-{pid}.npz"), **results)
    with open(os.path.join(out, f"values-{pid}.json"), "w") as file:
        json.dump(report, file)


def run_raise(out, pid):
    """Process 1 raises at its third step and exits, as an uncaught error
    in a script does; the others wait in the next step's collectives."""
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(auto_shard_dataset=False)
    )
    model = common.build()
    rows = own_rows(common.BATCH)
    x, y, _ = shares(rows)

    def fail(batch, logs):
        if pid == 1 and batch == 2:
            with open(os.path.join(out, "raised.json"), "w") as file:
                json.dump({"time": time.time()}, file)
            raise RuntimeError("a callback of process 1 failed")

    model.fit(
        x,
        y,
        batch_size=len(rows),
        epochs=50,
        verbose=0,
        callbacks=[
            keras_actgrad.GradientMonitor(),
            keras.callbacks.LambdaCallback(on_train_batch_end=fail),
        ],
    )


def main():
    pid, count, port = map(int, sys.argv[1:4])
    out, scenario = sys.argv[4], sys.argv[5]
    # JAX's defaults: 100 s (heartbeat), 300 s (shutdown barrier).
    timeouts = (
        {"heartbeat_timeout_seconds": 10, "shutdown_timeout_seconds": 10}
        if scenario == "raise"
        else None
    )
    initialize(pid, count, port, timeouts)
    start = time.monotonic()
    if scenario == "values":
        run_values(out, pid)
    else:
        run_raise(out, pid)
    print(
        f"process {pid}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True
    )


if __name__ == "__main__":
    main()
