"""What a GPU or TPU user runs by default, run on a CPU.

TensorFlow: `jit_compile=True` (Keras's "auto" on a GPU machine),
`mixed_float16` and `steps_per_execution=4`; JAX: `keras.RematScope`; a
KerasHub causal LM under each. References: the twin trained by hand
(`_monitor_replay.py`), the eager in-place reference
(`inplace_reference.py`), and `fit` without the monitor, bit for bit.
Marked `accelerator_defaults` (`pytest -m accelerator_defaults`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad._layers import select_layers
from tests import _monitor_replay as replay
from tests.inplace_reference import reference

BACKEND = keras.backend.backend()
pytestmark = [
    pytest.mark.accelerator_defaults,
    pytest.mark.filterwarnings("ignore:Gradient spike:UserWarning"),
    pytest.mark.filterwarnings("ignore:Non-finite gradients:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:keras_hub.*"),
]


@contextlib.contextmanager
def _defaults() -> Iterator[dict[str, object]]:
    """The backend's accelerator defaults: compile options, build scope."""
    if BACKEND == "tensorflow":
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        try:
            yield {"jit_compile": True, "steps_per_execution": 4}
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
    elif BACKEND == "jax":
        with keras.RematScope(mode="full"):
            yield {"steps_per_execution": 4}
    else:
        pytest.skip("PyTorch: no XLA, remat or steps_per_execution by default")


def _state(model: keras.Model) -> list[np.ndarray]:
    variables = model.variables + model.optimizer.variables
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


def test_monitor_at_accelerator_defaults_equals_a_replay() -> None:
    runs = []
    for monitored in (False, True):
        with _defaults() as options:
            model = replay.build()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", **options)
        monitor = replay.monitor()
        replay.fit(model, [monitor] if monitored else [])
        runs.append((_state(model), monitor.events))
    (plain, _), (watched, events) = runs
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [e["step"] for e in events] == list(range(1, 9))
    reference_steps, _ = replay.replay()
    if BACKEND == "tensorflow":
        # float16: the last step (its loss weighted 1000 times) overflows at
        # the loss scale, `LossScaleOptimizer` skips it, and the monitor
        # reports the non-finite gradient the step computed (no spike).
        assert not any(e["spike"] for e in events)
        assert not np.isfinite(events[-1]["global_grad_norm"])
        # float16 layers against a float32 twin: float16 rounding (measured:
        # at most 7e-4).
        assert replay.compare(events[:7], reference_steps[:7]) < 3e-3
    else:
        assert [e["step"] for e in events if e["spike"]] == [8]
        assert replay.compare(events, reference_steps) < 1e-4


def _causal_lm(options: dict[str, object]) -> keras.Model:
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
        dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **options,
    )
    return model


def test_causal_lm_at_accelerator_defaults() -> None:
    # In float32 (the reference's dtype), with the backend's compile mode and
    # build scope: the monitor's first step equals the eager reference on a
    # twin with the same weights, and training is unchanged bit for bit.
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(8, 8)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones((8, 8), "int32")}
    y = np.roll(tokens, -1, axis=1)
    with _defaults() as options:
        pass
    runs = []
    for monitored in (False, True):
        if BACKEND == "jax":
            # KerasHub's GPT-2 trains under "activations" remat (Keras
            # 3.15.1's "full" and "larger_than" fail to build it, without
            # this package too).
            with keras.RematScope(mode="activations"):
                model = _causal_lm(options)
        else:
            model = _causal_lm(options)
        selection = ["transformer_layer_*", "**/self_attention"]
        monitor = keras_actgrad.GradientMonitor(layers=selection, statistics=None)
        if monitored:
            twin = _causal_lm({})
            twin.set_weights(model.get_weights())
            sites = {s.name: s.layer for s in select_layers(twin, selection)}
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            first = {k: v for k, v in reference(twin, x, y, loss, sites).items()}
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=4,
            verbose=0,
            callbacks=[monitor] if monitored else [],
        )
        runs.append((_state(model), monitor.events))
    (plain, _), (watched, events) = runs
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    statistics = events[0]["statistics"]
    assert sorted(statistics) == sorted(first)
    for key, (activation, gradient) in first.items():
        g = gradient.astype(np.float64)
        np.testing.assert_allclose(
            [statistics[key]["grad_norm"], statistics[key]["act_mean"]],
            [np.linalg.norm(g), activation.astype(np.float64).mean()],
            rtol=2e-4,
            atol=1e-7,
            err_msg=key,
        )
