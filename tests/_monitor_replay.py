"""Shared by the distributed `GradientMonitor` runs (`_monitor_*_run.py`).

A small probed MLP, its data (the last batch weighted 1000 times, a
gradient spike) and an independent reference: a single-device twin trained
by hand, one backward pass per batch in training mode (a `tf.GradientTape`
watching the probe outputs, or `jax.grad` with zero perturbations added at
the probes), then the twin optimizer's `apply`; the statistics of the
probe gradients and activations in NumPy (float64).
"""

import keras
import numpy as np

import keras_actgrad

N, D, BATCH = 128, 5, 16
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, D)).astype("float32")
Y = RNG.normal(size=(N, 3)).astype("float32")
SAMPLE_WEIGHT = np.ones(N, "float32")
SAMPLE_WEIGHT[-BATCH:] = 1000.0  # the last step: 1000 times the loss


def build():
    # Functional: its variable paths are "d1/kernel", ... (a `LayoutMap`
    # key must match a path whole).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((D,))
    h = keras.layers.Dense(12, activation="tanh", name="d1")(inputs)
    h = keras_actgrad.GradientProbe(name="p1")(h)
    h = keras.layers.Dense(8, activation="relu", name="d2")(h)
    h = keras_actgrad.GradientProbe(name="p2")(h)
    h = keras.layers.Dense(3, name="d3")(h)
    outputs = keras_actgrad.GradientProbe(name="p3")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    return model


def monitor():
    return keras_actgrad.GradientMonitor(
        statistics=None, histograms_every_n_steps=3, spike_factor=5.0
    )


def fit(model, callbacks):
    return model.fit(
        X,
        Y,
        sample_weight=SAMPLE_WEIGHT,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def state(model):
    """Every variable's value; under tf.distribute, every replica's copy."""
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    values = []
    for variable in variables:
        copies = getattr(variable.value, "values", None)
        if isinstance(copies, tuple):
            values += [np.asarray(copy.numpy()) for copy in copies]
        else:
            values.append(np.asarray(variable.numpy()))
    return values


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def _backward(twin, x, y, sample_weight):
    """(probe activations, probe gradients, weight gradients) of one batch."""
    loss_fn = keras.losses.MeanSquaredError()
    variables = list(twin.trainable_variables)
    probe = keras_actgrad.GradientProbe
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            h = tf.constant(x)
            watched = []
            for layer in twin.layers[1:]:  # after the InputLayer
                h = layer(h, training=True)
                if isinstance(layer, probe):
                    tape.watch(h)
                    watched.append(h)
            loss = loss_fn(y, h, sample_weight=sample_weight)
        grads = tape.gradient(loss, watched + variables)
        activations = [_numpy(a) for a in watched]
        return (
            activations,
            [_numpy(g) for g in grads[: len(watched)]],
            grads[len(watched) :],
        )
    import jax
    import jax.numpy as jnp

    def forward(values, perturbations):
        mapping = list(zip(variables, values, strict=True)) + [
            (v, v.value) for v in twin.non_trainable_variables
        ]
        with keras.StatelessScope(state_mapping=mapping):
            h = jnp.asarray(x)
            outputs = []
            for layer in twin.layers[1:]:  # after the InputLayer
                h = layer(h, training=True)
                if isinstance(layer, probe):
                    h = h + perturbations[len(outputs)]
                    outputs.append(h)
            return loss_fn(y, h, sample_weight=sample_weight), outputs

    values = [v.value for v in variables]
    _, outputs = forward(values, [0.0] * 3)
    zeros = [jnp.zeros(o.shape) for o in outputs]
    (weight_grads, probe_grads), _ = jax.grad(forward, argnums=(0, 1), has_aux=True)(
        values, zeros
    )
    return [_numpy(a) for a in outputs], [_numpy(g) for g in probe_grads], weight_grads


def statistics(a, g):
    """Every statistic of one probe, in NumPy (float64)."""
    sample_norms = np.linalg.norm(g.reshape(len(g), -1), axis=1)
    return {
        "grad_norm": np.linalg.norm(g),
        "grad_mean_abs": np.abs(g).mean(),
        "grad_std": g.std(),
        "grad_max_abs": np.abs(g).max(),
        "grad_zero_fraction": np.mean(g == 0),
        "act_mean": a.mean(),
        "act_std": a.std(),
        "act_zero_fraction": np.mean(a == 0),
        "dead_unit_fraction": np.mean(np.all(a.reshape(-1, a.shape[-1]) == 0, axis=0)),
        "sample_grad_norm_mean": sample_norms.mean(),
        "sample_grad_norm_max": sample_norms.max(),
        "nonfinite": float(np.sum(~np.isfinite(g))),
    }


def replay():
    """The reference of every step: a twin trained by hand, on one device."""
    twin = build()
    probes = [
        layer.name
        for layer in twin.layers
        if isinstance(layer, keras_actgrad.GradientProbe)
    ]
    steps = []
    for start in range(0, N, BATCH):
        batch = slice(start, start + BATCH)
        activations, probe_grads, weight_grads = _backward(
            twin, X[batch], Y[batch], SAMPLE_WEIGHT[batch]
        )
        old = [_numpy(v.value) for v in twin.trainable_variables]
        twin.optimizer.apply(weight_grads, twin.trainable_variables)
        new = [_numpy(v.value) for v in twin.trainable_variables]
        grad_norms = [float(np.linalg.norm(_numpy(g))) for g in weight_grads]
        steps.append(
            {
                "statistics": {
                    name: statistics(a, g)
                    for name, a, g in zip(probes, activations, probe_grads, strict=True)
                },
                "ranges": {
                    name: (float(g.min()), float(g.max()), g.size)
                    for name, g in zip(probes, probe_grads, strict=True)
                },
                "weight_grad_norms": grad_norms,
                "update_norms": [
                    float(np.linalg.norm(b - a)) for a, b in zip(old, new, strict=True)
                ],
                "update_ratios": [
                    float(np.linalg.norm(b - a)) / float(np.linalg.norm(a))
                    if np.any(a)
                    else float("inf")
                    for a, b in zip(old, new, strict=True)
                ],
                "global_grad_norm": float(np.linalg.norm(grad_norms)),
            }
        )
    return steps, twin.get_weights()


def _error(got, expected):
    got, expected = float(got), float(expected)
    if got == expected:  # also inf == inf (a ratio to a zero bias)
        return 0.0
    # Relative, but absolute below 1e-3 (a mean that cancels to ~0).
    return abs(got - expected) / max(abs(expected), 1e-3)


def compare(events, reference):
    """Worst relative error of `events` against reference events or a replay.

    `reference` holds the monitor's events of another run, or the steps of
    `replay()`: every statistic the events hold, the weight-gradient,
    update and update-ratio norms (in variable order), the global norm, and
    the histograms' ranges and totals (their counts, against other events).
    """
    if len(events) != len(reference):
        return float("inf")
    worst = 0.0
    for event, expected in zip(events, reference, strict=True):
        for probe, values in event["statistics"].items():
            for name, value in values.items():
                if np.isnan(value):
                    continue
                worst = max(worst, _error(value, expected["statistics"][probe][name]))
        for field in ("weight_grad_norms", "update_norms", "update_ratios"):
            got = list(event[field].values())
            want = expected[field]
            want = list(want.values()) if isinstance(want, dict) else want
            if len(got) != len(want):
                return float("inf")
            for a, b in zip(got, want, strict=True):
                worst = max(worst, _error(a, b))
        worst = max(
            worst, _error(event["global_grad_norm"], expected["global_grad_norm"])
        )
        for probe, pair in event["histograms"].items():
            low, high, counts = pair["gradient"]
            if "ranges" in expected:
                want_low, want_high, size = expected["ranges"][probe]
                worst = max(worst, _error(low, want_low), _error(high, want_high))
                if counts.sum() != size:
                    return float("inf")
                continue
            for which in ("gradient", "activation"):
                low, high, counts = pair[which]
                other = expected["histograms"][probe][which]
                worst = max(worst, _error(low, other[0]), _error(high, other[1]))
                # An entry on a bin edge may fall on either side of it.
                moved = np.abs(counts - other[2]).sum()
                if counts.sum() != other[2].sum() or moved > 2:
                    return float("inf")
    return worst
