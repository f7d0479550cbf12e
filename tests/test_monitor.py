"""`GradientMonitor`: the training step's own gradients, checked by replay.

References are independent of the code under test: a twin model with the
same weights trained by hand (one backward pass per batch in training mode:
a `tf.GradientTape` watching the probe outputs, `jax.grad` with zero
perturbations added at the probes, `torch.autograd.grad` with respect to
the probe outputs), then the twin's optimizer's `apply`.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientMonitor, GradientProbe

BACKEND = keras.backend.backend()
N, D, BATCH = 64, 8, 16
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, D)).astype("float32")
Y = (np.arange(N) % 3).astype("int32")


def _model(dropout: bool = False, loss_scale: bool = False) -> keras.Model:
    keras.utils.set_random_seed(1)
    layers = [keras.Input((D,)), keras.layers.Dense(16, activation="relu", name="h1")]
    if dropout:
        layers += [keras.layers.Dropout(0.3), keras.layers.BatchNormalization()]
    layers += [
        keras.layers.Dense(16, activation="tanh", name="h2"),
        keras.layers.Dense(3, name="logits"),
    ]
    model = keras.Sequential(layers)
    optimizer: keras.optimizers.Optimizer = keras.optimizers.Adam(1e-2)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return keras_actgrad.insert_probes(model)


def _numpy(value: object) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _replay_gradients(
    twin: keras.Model, x: np.ndarray, y: np.ndarray
) -> tuple[list[np.ndarray], list[object]]:
    """d loss / d (probe outputs) and d loss / d weights, by hand."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = list(twin.trainable_variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            h = tf.constant(x)
            watched = []
            for layer in twin.layers:
                h = layer(h, training=True)
                if isinstance(layer, GradientProbe):
                    tape.watch(h)
                    watched.append(h)
            loss = loss_fn(y, h)
        grads = tape.gradient(loss, watched + variables)
        return [g.numpy() for g in grads[: len(watched)]], grads[len(watched) :]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        shapes = []
        h = x
        for layer in twin.layers:
            h = layer(h)
            if isinstance(layer, GradientProbe):
                shapes.append(h.shape)

        def loss_of(values: list[object], perturbations: list[object]) -> object:
            mapping = list(zip(variables, values, strict=True)) + [
                (v, v.value) for v in twin.non_trainable_variables
            ]
            with keras.StatelessScope(state_mapping=mapping):
                h = jnp.asarray(x)
                index = 0
                for layer in twin.layers:
                    h = layer(h, training=True)
                    if isinstance(layer, GradientProbe):
                        h = h + perturbations[index]
                        index += 1
                return loss_fn(y, h)

        weight_grads, probe_grads = jax.grad(loss_of, argnums=(0, 1))(
            [v.value for v in variables], [jnp.zeros(s) for s in shapes]
        )
        return [np.asarray(g) for g in probe_grads], list(weight_grads)
    import torch

    h = torch.as_tensor(x)
    watched = []
    for layer in twin.layers:
        h = layer(h, training=True)
        if isinstance(layer, GradientProbe):
            watched.append(h)
    loss = loss_fn(torch.as_tensor(y), h)
    grads = torch.autograd.grad(loss, watched + [v.value for v in variables])
    return (
        [g.detach().numpy() for g in grads[: len(watched)]],
        [g.detach() for g in grads[len(watched) :]],
    )


def _relative(got: float, expected: float) -> float:
    return abs(got - expected) / abs(expected)


@pytest.mark.compat
def test_values_equal_a_replay_by_hand() -> None:
    model, twin = _model(), _model()
    twin.set_weights(model.get_weights())
    monitor = GradientMonitor(statistics=None, histograms_every_n_steps=2)
    model.fit(
        X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor]
    )
    assert [e["step"] for e in monitor.events] == [1, 2, 3, 4]
    assert all(e["kind"] == "step" for e in monitor.events)
    probes = [layer.name for layer in twin.layers if isinstance(layer, GradientProbe)]
    paths = [v.path for v in model.trainable_variables]
    worst = 0.0
    for index, event in enumerate(monitor.events):
        batch = slice(index * BATCH, (index + 1) * BATCH)
        probe_grads, weight_grads = _replay_gradients(twin, X[batch], Y[batch])
        for name, g in zip(probes, probe_grads, strict=True):
            values = event["statistics"][name]
            expected = {
                "grad_norm": np.linalg.norm(g),
                "grad_mean_abs": np.abs(g).mean(),
                "grad_max_abs": np.abs(g).max(),
                "grad_std": g.std(),
                "sample_grad_norm_max": np.linalg.norm(g, axis=1).max(),
            }
            for statistic, value in expected.items():
                worst = max(worst, _relative(values[statistic], value))
            if index % 2 == 0:
                low, high, counts = event["histograms"][name]["gradient"]
                assert counts.sum() == g.size
                np.testing.assert_allclose([low, high], [g.min(), g.max()], rtol=1e-5)
            else:
                assert event["histograms"] == {}
        old = [_numpy(v.value) for v in twin.trainable_variables]
        twin.optimizer.apply(weight_grads, twin.trainable_variables)
        new = [_numpy(v.value) for v in twin.trainable_variables]
        norms = [float(np.linalg.norm(_numpy(g))) for g in weight_grads]
        for path, norm, before, after in zip(paths, norms, old, new, strict=True):
            update = float(np.linalg.norm(after - before))
            worst = max(worst, _relative(event["weight_grad_norms"][path], norm))
            worst = max(worst, _relative(event["update_norms"][path], update))
            if np.linalg.norm(before) > 0:
                ratio = update / float(np.linalg.norm(before))
                worst = max(worst, _relative(event["update_ratios"][path], ratio))
        worst = max(
            worst, _relative(event["global_grad_norm"], float(np.linalg.norm(norms)))
        )
    assert worst < 1e-4
    # The twin, trained by hand, ends where `fit` did.
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _state(model: keras.Model) -> list[np.ndarray]:
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    return [_numpy(v.value) for v in variables]


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed_float16"])
def test_training_is_bit_identical(mixed: bool) -> None:
    runs = []
    for monitored in (False, True):
        if mixed:
            keras.mixed_precision.set_dtype_policy("mixed_float16")
        try:
            model = _model(dropout=True, loss_scale=mixed)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        monitor = GradientMonitor(
            2, statistics=None, spike_factor=3.0, histograms_every_n_steps=3
        )
        history = model.fit(
            X,
            Y,
            batch_size=BATCH,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[monitor] if monitored else [],
        )
        runs.append((_state(model), history.history, monitor.events))
    (plain, plain_history, _), (watched, watched_history, events) = runs
    assert [e["step"] for e in events] == [1, 3, 4, 5, 7, 9, 10, 11]
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain_history == watched_history
    # Float16 gradients are unscaled and finite.
    for event in events:
        assert np.isfinite(event["global_grad_norm"])
        for values in event["statistics"].values():
            assert 0 < values["grad_norm"] < 100


def test_a_constructed_spike_is_caught() -> None:
    model = _model()
    monitor = GradientMonitor(spike_factor=5.0)
    x, y = np.concatenate([X] * 3), np.concatenate([Y] * 3)
    sample_weight = np.ones(len(x), "float32")
    sample_weight[-BATCH:] = 1000.0  # the last step: 1000 times the loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[monitor],
        )
    messages = [str(w.message) for w in caught if "spike" in str(w.message)]
    assert [e["step"] for e in monitor.events if e["spike"]] == [12]
    assert len(messages) == 1 and "training step 12" in messages[0]
    last = monitor.events[-1]
    largest = max(last["statistics"], key=lambda p: last["statistics"][p]["grad_norm"])
    assert f"'{largest}'" in messages[0]
    # Recorded in full: every statistic and both histograms of every probe.
    assert all(len(v) == 12 for v in last["statistics"].values())
    assert set(last["histograms"]) == set(last["statistics"])
    assert all(len(v) == 1 for v in monitor.events[0]["statistics"].values())


def test_steps_not_monitored_run_keras_function() -> None:
    model = _model()
    monitor = GradientMonitor(every_n_steps=3)
    model.fit(X, Y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor])
    assert [e["step"] for e in monitor.events] == [1, 4, 7]
    plain = model.train_function
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    assert model.train_function is plain  # put back after `fit`
    assert [e["step"] for e in monitor.events][-2:] == [7, 10]
    columns = monitor.to_numpy()
    assert columns["step"].tolist() == [1, 4, 7, 10]
    assert columns["actgrad/h1_probe/grad_norm"].shape == (4,)
    assert (
        columns[f"actgrad_weights/{model.trainable_variables[0].path}/update_norm"][0]
        > 0
    )


def test_tensorboard_step_tags(tmp_path: object) -> None:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    model = _model()
    monitor = GradientMonitor(log_dir=str(tmp_path), histograms_every_n_steps=4)
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path / "actgrad"),
        size_guidance={"tensors": 0},  # type: ignore[operator]
    )
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    kernel = model.trainable_variables[0].path
    from keras_actgrad._tags import global_summary_tag, summary_tag

    for tag in (
        summary_tag("step", "h1_probe", "grad_norm"),
        summary_tag("step", "h1_probe", "gradient"),
        global_summary_tag("step"),
    ):
        assert tag in tags, (tag, tags)
    # The weights' norms are packed (read by `to_numpy`), not stock scalars.
    assert not any(tag.startswith("actgrad_weights_step") for tag in tags)
    columns = monitor.to_numpy()
    for statistic, field in (
        ("grad_norm", "weight_grad_norms"),
        ("update_norm", "update_norms"),
        ("update_ratio", "update_ratios"),
    ):
        key = f"actgrad_weights/{kernel}/{statistic}"
        assert columns[key].tolist() == [e[field][kernel] for e in monitor.events]
    tag = summary_tag("step", "h1_probe", "grad_norm")
    steps = [e.step for e in accumulator.Tensors(tag)]
    assert steps == [1, 2, 3, 4]
    value = accumulator.Tensors(global_summary_tag("step"))[2]
    got = float(tensor_util.make_ndarray(value.tensor_proto))
    assert got == pytest.approx(monitor.events[2]["global_grad_norm"], rel=1e-6)


def test_a_train_step_override_measures_as_keras_step() -> None:
    # An override that calls Keras's step: the same numbers as the model
    # without the override (one pass, keys as Keras's own step names them).
    class Plain(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="m")
            self.dense = keras.layers.Dense(1, name="dense")
            self.probe = GradientProbe(name="p")

        def call(self, x: object) -> object:
            return self.probe(self.dense(x))

    class Custom(Plain):
        def train_step(self, *args: object) -> object:
            return super().train_step(*args)

    events = []
    for cls in (Plain, Custom):
        keras.utils.set_random_seed(0)
        model = cls()
        model.compile("sgd", "mse")
        monitor = GradientMonitor()
        model.fit(X, X[:, :1], batch_size=16, verbose=0, callbacks=[monitor])
        assert monitor.probe_order == ["p"]
        events.append(monitor.events)
    for plain, custom in zip(*events, strict=True):
        assert custom["statistics"] == plain["statistics"]
        assert custom["weight_grad_norms"] == plain["weight_grad_norms"]
        assert custom["update_norms"] == plain["update_norms"]


def test_a_model_without_probes_is_refused() -> None:
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="insert_probes"):
        model.fit(X, X[:, :1], verbose=0, callbacks=[GradientMonitor()])


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"every_n_steps": 0}, "positive int"),
        ({"every_n_steps": 1.5}, "positive int"),
        ({"statistics": ["grad_nrom"]}, "Accepted names"),
        ({"histograms_every_n_steps": -1}, "positive int or None"),
        ({"spike_factor": 1.0}, "greater than 1"),
        ({"spike_factor": "big"}, "greater than 1"),
        ({"on_nonfinite": "ignore"}, "'warn', 'raise', 'stop'"),
        ({"histogram_bins": 0}, "positive int"),
        ({"log_dir": 3}, "path"),
        ({"vanishing_threshold": 1e5}, "smaller than"),
    ],
)
def test_bad_arguments_fail_at_construction(
    kwargs: dict[str, object], accepted: str
) -> None:
    with pytest.raises(ValueError, match="Received") as error:
        GradientMonitor(**kwargs)  # type: ignore[arg-type]
    assert accepted in str(error.value)


@pytest.mark.parametrize("mode", ["run_eagerly", "jit_compile_false"])
def test_uncompiled_steps_are_monitored_alike(mode: str) -> None:
    compiled = _model()
    monitor = GradientMonitor()
    compiled.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    eager = _model()
    if mode == "run_eagerly":
        eager.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
    else:
        eager.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    again = GradientMonitor()
    eager.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[again])
    for first, second in zip(monitor.events, again.events, strict=True):
        for probe, values in first["statistics"].items():
            assert second["statistics"][probe]["grad_norm"] == pytest.approx(
                values["grad_norm"], rel=1e-5
            )


def test_layers_in_place_equal_the_probes() -> None:
    # A plain model measured in place at "h1" and "h2" gives the numbers of
    # the same model with probes after those layers.
    probed = _model()
    plain = keras_actgrad.strip_probes(probed)
    plain.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    by_probe, in_place = GradientMonitor(), GradientMonitor(layers=["h1", "h2"])
    probed.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[by_probe])
    twin = keras_actgrad.strip_probes(_model())
    twin.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    twin.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[in_place])
    sites = in_place.probe_order  # layer paths, e.g. "sequential_1/h1"
    assert [site.rsplit("/", 1)[-1] for site in sites] == ["h1", "h2"]
    for a, b in zip(by_probe.events, in_place.events, strict=True):
        for probe, site in zip(("h1_probe", "h2_probe"), sites, strict=True):
            assert b["statistics"][site]["grad_norm"] == pytest.approx(
                a["statistics"][probe]["grad_norm"], rel=1e-5
            )
