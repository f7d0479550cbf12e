"""Shared by the multi-process runs (`_multihost_run.py`) and their reference.

The probed MLP and data of `_monitor_replay.py` (the last batch of each
epoch weighted 1000 times: a gradient spike), a fixed probe batch, the
callbacks every run uses, and `flatten`: what a run measured as named NumPy
arrays, compared key by key between the processes and one process.
"""

import warnings

import _monitor_replay as replay
import numpy as np

import keras_actgrad

N, D, BATCH = replay.N, replay.D, replay.BATCH
X, Y, SAMPLE_WEIGHT = replay.X, replay.Y, replay.SAMPLE_WEIGHT
_RNG = np.random.default_rng(1)
PROBE_X = _RNG.normal(size=(32, D)).astype("float32")
PROBE_Y = _RNG.normal(size=(32, 3)).astype("float32")
EPOCHS = 1
build = replay.build


def callbacks(probe_share, log_dir):
    """The monitor, a callback on `probe_share`, one on the whole batch.

    The spike (the last batch, weighted 1000 times) is recorded in full:
    every statistic and histogram of that step.
    """
    monitor = keras_actgrad.GradientMonitor(
        statistics=None, spike_factor=5.0, log_dir=log_dir
    )
    callback = keras_actgrad.ActivationGradientCallback(
        probe_share,
        log_dir=log_dir,
        statistics=None,
        weight_gradients=True,
        probe_at_start=True,
        batch_freq=5,
    )
    whole = keras_actgrad.ActivationGradientCallback(
        (PROBE_X, PROBE_Y), weight_gradients=True, probe_batch_size=8
    )
    return monitor, callback, whole


def _histograms(prefix, events, out):
    for i, event in enumerate(events):
        for probe, pair in sorted(event["histograms"].items()):
            for kind, (low, high, counts) in sorted(pair.items()):
                out[f"{prefix}/{i}/{probe}/{kind}/range"] = np.asarray([low, high])
                out[f"{prefix}/{i}/{probe}/{kind}/counts"] = np.asarray(counts)


def flatten(name, monitor, callback, whole, share, chunked, model):
    """Everything a run measured, as `{key: array}` (`whole`, `chunked`: or None)."""
    out = {}
    for key, values in monitor.to_numpy().items():
        out[f"{name}/monitor/{key}"] = values
    out[f"{name}/monitor/spike"] = np.asarray([e["spike"] for e in monitor.events])
    _histograms(f"{name}/monitor/histograms", monitor.events, out)
    for kind in ("start", "epoch", "batch"):
        for key, values in callback.to_numpy(kind).items():
            out[f"{name}/callback/{kind}/{key}"] = values
    _histograms(f"{name}/callback/histograms", callback.events, out)
    if whole is not None:
        for key, values in whole.to_numpy("epoch").items():
            out[f"{name}/whole/{key}"] = values
        _histograms(f"{name}/whole/histograms", whole.events, out)
    for label, results in (("share", share), ("chunked", chunked)):
        if results is None:
            continue
        for probe, result in results.items():
            out[f"{name}/{label}/{probe}/activation"] = result.activation
            out[f"{name}/{label}/{probe}/gradient"] = result.gradient
    for i, weight in enumerate(weights(model)):
        out[f"{name}/weights/{i}"] = weight
    return out


def weights(model):
    """The model's weights, whole (gathered from every process)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return model.get_weights()
    return [
        np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
        for v in model.weights
    ]


def reference():
    """The same measurements by one process on one device (global batches)."""
    model = build()
    monitor, callback, whole = callbacks((PROBE_X, PROBE_Y), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the spike's
        model.fit(
            X,
            Y,
            sample_weight=SAMPLE_WEIGHT,
            batch_size=BATCH,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=[monitor, callback, whole],
        )
    share = keras_actgrad.activation_gradients(model, PROBE_X, PROBE_Y)
    return flatten("reference", monitor, callback, whole, share, share, model)


def worst_error(got, expected):
    """The largest relative error (absolute below 1e-3), NaN where NaN."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return np.inf
    if not np.array_equal(np.isnan(got), np.isnan(expected)):
        return np.inf
    mask = ~np.isnan(got)
    if not mask.any():
        return 0.0
    a, b = got[mask], expected[mask]
    same = a == b  # also inf == inf
    with np.errstate(invalid="ignore"):
        error = np.abs(a - b) / np.maximum(np.abs(b), 1e-3)
    return float(np.max(np.where(same, 0.0, error)))
