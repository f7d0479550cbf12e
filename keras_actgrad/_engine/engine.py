"""The engine: one compiled forward and backward pass over a batch.

It checks the model and the batch, resolves the loss, caches one compiled
pass per model and configuration (built by the backend's adapter), and
returns a complete `PassResult`: the reducer's output as NumPy and the taps
the pass reached, in forward order.

Every pass runs inside a `keras.StatelessScope`: variable assignments made
during it (BatchNormalization moving statistics, seed-generator state,
metric and loss trackers) are collected by the scope and dropped, so a pass
never changes the model, whatever `training` is.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import keras
import numpy as np

from keras_actgrad._backends import get_adapter, processes
from keras_actgrad._backends.base import Adapter, LossSpec, PassConfig, Tapped
from keras_actgrad._engine.inputs import (
    _declared_outputs,
    check_batch_sizes,
    check_inputs,
    check_labels,
    describe,
    standardize,
)
from keras_actgrad._engine.losses import needs_labels, resolve_loss
from keras_actgrad._layers import reached as reached_site
from keras_actgrad._probe import GradientProbe, find_probes
from keras_actgrad._training_loss import TrainingLoss, pack

# Compiled passes kept per model (least recently used dropped).
MAX_COMPILED_FUNCTIONS = 16


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch checked against its model and converted as `fit` converts it.

    Made by `ProbeEngine.prepare`; numeric arrays are device tensors, so a
    batch used at every event moves to the device once.
    """

    x: Any
    y: Any
    sample_weight: Any


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one pass returns: the reduction and the taps it reached.

    Attributes:
        outputs: The reducer's output, with every backend tensor turned
            into a NumPy array (`None` stays `None`).
        reached: Tap names in the order the forward pass reached them
            (`name@1`, ... for repeated visits).
        unreached: The model's taps the pass did not reach.
        differentiable: For each reached tap, whether its tensor is
            floating point (else it has no gradient).
        weight_paths: Paths of the trainable variables whose gradients the
            pass took (empty unless `weight_gradients`), without repeats.
        device: What a reducer returned under the key `"device"` of its
            output dict, left as backend tensors on the device (sums carried
            from one chunk of a batch to the next); `None` if nothing.
    """

    outputs: Any
    reached: list[str]
    unreached: list[str]
    differentiable: dict[str, bool]
    weight_paths: list[str]
    device: Any = None

    @property
    def order(self) -> list[str]:
        """Every tap: the reached ones in forward order, then the others."""
        return self.reached + self.unreached


def check_model(
    model: keras.Model, loss: LossSpec, y: Any, in_place: bool = False
) -> list[GradientProbe]:
    """Checks what a pass needs of the model; returns its probes.

    With `in_place` (layers measured in place), probes are neither needed
    nor returned.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    training_loss = isinstance(loss, TrainingLoss)
    if not training_loss and type(model).call is keras.Model.call:
        raise ValueError(
            f"Model '{model.name}' is a {type(model).__name__} without a "
            "`call` method (its training is written in its `train_step`), so "
            "the probe pass cannot run it as `model(x)`. Say what the loss "
            "is: pass `loss=keras_actgrad.TrainingLoss(function)`, where "
            "`function(model, data)` runs the forward pass as `train_step` "
            "does and returns the loss (every probe it crosses is measured), "
            "or measure a sub-model with a loss of its own, e.g. "
            "`keras_actgrad.activation_gradients(model.discriminator, x, y, "
            f"loss=...)`. Received: loss={loss!r}."
        )
    if not model.built and not training_loss:
        raise ValueError(
            f"Model '{model.name}' has not been built yet, so it has no weights "
            "to probe. Build it first: give it an input shape "
            "(`keras.Input(...)`), call it on a batch, or call `model.build(...)`. "
            f"Received: model '{model.name}' with built=False."
        )
    probes = [] if in_place else find_probes(model)
    if not probes and not in_place:
        raise ValueError(
            f"No `GradientProbe` found in model '{model.name}'. Measure layers "
            "in place with `layers=` (e.g. `layers=keras.layers.Dense` or "
            "`layers='transformer_layer_*'`), add probes with "
            "`model = keras_actgrad.insert_probes(model)`, or place "
            "`keras_actgrad.GradientProbe()` layers yourself. Received: model "
            f"with {len(model.layers)} layers, 0 probes."
        )
    names = [probe.name for probe in probes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"Model '{model.name}' has several probes named {duplicates}; results "
            "and log keys are keyed by probe name, so names must be unique. "
            "Rename them (`GradientProbe(name=...)`). "
            f"Received: probe names {names}."
        )
    if isinstance(loss, str) and loss == "model":
        if not getattr(model, "compiled", False):
            raise ValueError(
                f"`loss='model'` uses the compiled training loss, but model "
                f"'{model.name}' is not compiled. Call `model.compile(loss=...)` "
                "first, or pass `loss=` a Keras loss or a callable "
                "`loss(y_true, y_pred)`, or `loss='sum'`. "
                "Received: an uncompiled model."
            )
        if y is None and getattr(model, "loss", None) is not None:
            raise ValueError(
                f"`loss='model'` needs the labels `y` to compute the compiled loss "
                f"of model '{model.name}'. Pass `y`, or use `loss='sum'` (no "
                "labels). Received: y=None."
            )
    elif needs_labels(loss) and y is None:
        raise ValueError(
            f"`loss={loss!r}` compares predictions with labels, so it needs `y`. "
            "Pass `y`, or use `loss='sum'` or a plain function `loss(y_true, "
            "y_pred)` that ignores `y_true` (it receives None). Received: y=None."
        )
    return probes


def _to_device(data: Any, spanning: bool = False) -> Any:
    """Numeric NumPy leaves become backend tensors (moved to the device once).

    With `spanning` (several JAX processes, one distribution), the leaves
    of the global batch are placed on the devices of every process.
    """
    to_tensor = processes().place if spanning else keras.ops.convert_to_tensor

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biuf":
            return to_tensor(leaf)
        return leaf

    return None if data is None else keras.tree.map_structure(convert, data)


class ProbeEngine:
    """Compiled passes of one model, cached per configuration.

    Backend frameworks retrace a compiled function once per new input
    signature; `trace_count` counts those traces (useful to check reuse).
    """

    def __init__(self, model: keras.Model) -> None:
        self._model_ref = weakref.ref(model)
        self._adapter = get_adapter()
        self._functions: collections.OrderedDict[Hashable, Callable[..., Any]] = (
            collections.OrderedDict()
        )
        self.trace_count = 0
        # Per configuration: the taps its last trace reached, and which of
        # them are differentiable.
        self._traced: dict[Hashable, tuple[list[str], dict[str, bool]]] = {}
        self._warned: set[str] = set()

    @property
    def model(self) -> keras.Model:
        model = self._model_ref()
        if model is None:  # pragma: no cover - engines die with their model
            raise RuntimeError("The model of this probe engine was deleted.")
        return model

    def _on_trace(self, key: Hashable, tapped: list[Tapped]) -> None:
        self.trace_count += 1
        self._traced[key] = (
            [t.name for t in tapped],
            {t.name: t.differentiable for t in tapped},
        )

    def function(self, config: PassConfig) -> Callable[..., Any]:
        key = config.key
        function = self._functions.get(key)
        if function is not None:
            self._functions.move_to_end(key)
        else:
            loss_fn = resolve_loss(self.model, config.loss, config.training)

            def on_trace(tapped: list[Tapped]) -> None:
                self._on_trace(key, tapped)

            function = self._adapter.compile(self.model, loss_fn, config, on_trace)
            self._functions[key] = function
            # A new loss object per call (e.g. a new lambda) compiles a new
            # function: keep only the most recently used ones.
            while len(self._functions) > MAX_COMPILED_FUNCTIONS:
                self._functions.popitem(last=False)
        return function

    def prepare(
        self, x: Any, y: Any = None, sample_weight: Any = None, loss: LossSpec = "model"
    ) -> Batch:
        """Checks a batch against the model and moves it to the device.

        Under several JAX processes with one distribution over them, the
        batch is first made the global batch (each process's share, or the
        same whole batch on each: `processes_jax.global_batch`), then
        checked, the same on every process.
        """
        x, y, sample_weight = standardize(x), standardize(y), standardize(sample_weight)
        if isinstance(loss, TrainingLoss):
            # The function reads the batch as `train_step` does.
            check_batch_sizes(x, y, sample_weight)
            data = pack(x, y, sample_weight)
            check_inputs(None, data)
            return Batch(_to_device(data), None, None)
        spanning = processes().spanning()
        if spanning:
            x, y, sample_weight = processes().global_batch(x, y, sample_weight)
        check_inputs(self.model, x)
        check_batch_sizes(x, y, sample_weight)
        check_labels(y, sample_weight, loss)
        return Batch(
            _to_device(x, spanning),
            _to_device(y, spanning),
            _to_device(sample_weight, spanning),
        )

    def run(self, batch: Batch, config: PassConfig, inputs: Any = None) -> PassResult:
        """Runs one pass over a prepared batch.

        `inputs`, a nested structure of backend tensors, goes to the
        reducer as an input of the compiled pass (see `base.reduce`): new
        values of the same shapes reuse the compiled pass.
        """
        model = self.model
        probes = check_model(model, config.loss, batch.y, bool(config.sites))
        function = self.function(config)
        try:
            if inputs is None:
                output = function(batch.x, batch.y, batch.sample_weight)
            else:
                output = function(batch.x, batch.y, batch.sample_weight, inputs)
        except (ValueError, TypeError, RuntimeError) as error:
            # A failed trace never reaches `on_trace`, so `trace_count` cannot
            # tell a trace-time error from a run-time one: wrap them all.
            # PyTorch reports shape mismatches as RuntimeError.
            if isinstance(error, RuntimeError) and keras.backend.backend() != "torch":
                raise
            if type(error).__name__ == "UnexpectedTracerError":  # JAX
                first = str(error).splitlines()[0] if str(error) else ""
                raise ValueError(
                    f"The probe pass of model '{model.name}' failed: a tap (a "
                    "`GradientProbe` or a layer measured in place) runs inside "
                    "a function JAX transforms on its own, e.g. one wrapped in "
                    "`keras.remat(...)` or `jax.checkpoint`, which a measured "
                    "tensor cannot leave. Place the probe outside that "
                    "function, or measure the layer that calls it with "
                    "`layers=[...]` (layers built under `keras.RematScope` are "
                    f"handled). Received: UnexpectedTracerError: {first}"
                ) from error
            outputs = _declared_outputs(model)
            raise ValueError(
                f"The probe pass of model '{model.name}' failed: {error}\n"
                "Check that `x` and `y` are shaped as `fit` takes them for this "
                "model and that the loss fits its outputs"
                + ("" if outputs is None else f" (output shapes: {outputs})")
                + ". "
                f"Received: x={describe(batch.x)}, y={describe(batch.y)}, "
                f"sample_weight={describe(batch.sample_weight)}, "
                f"loss={config.loss!r}."
            ) from error
        # The taps a pass reaches can depend on the configuration (a
        # subclassed model's `call` may branch on `training`), so they are
        # those of this configuration's trace.
        reached, differentiable = self._traced.get(config.key, ([], {}))
        if isinstance(config.loss, TrainingLoss) and not reached:
            what = "layer selected with `layers=`" if config.sites else "GradientProbe"
            raise ValueError(
                f"The loss function {config.loss!r} runs no {what} of model "
                f"'{model.name}', so there is no gradient to measure. Call the "
                "sub-models that hold the probes inside the function (the "
                "forward pass of the loss), or place probes in the sub-models "
                f"it calls. Received: loss={config.loss!r}, taps reached: none."
            )
        if config.sites:
            unreached = [
                site.name
                for site in config.sites
                if not reached_site(site.name, reached)
            ]
        else:
            unreached = [p.name for p in probes if p.name not in set(reached)]
        self._warn_about_probes(model, unreached, differentiable, bool(config.sites))
        weight_paths = (
            list(dict.fromkeys(v.path for v in model.trainable_variables))
            if config.weight_gradients
            else []
        )
        device = output.pop("device", None) if isinstance(output, dict) else None
        return PassResult(
            device=device,
            outputs=self._to_numpy(output),
            reached=list(reached),
            unreached=unreached,
            differentiable=dict(differentiable),
            weight_paths=weight_paths,
        )

    def _to_numpy(self, value: Any) -> Any:
        """The pass's output as NumPy, releasing each tensor once converted.

        The output's dicts and lists are the pass's own (built by each
        call), so they are emptied as their tensors are converted: a host
        copy (TensorFlow's `.numpy()` copies) and the device tensor are
        alive together for one tensor at a time, not for all of them
        (`activation_gradients` of 24 probes of 8 MB: 776 -> 4xx MB peak
        above the warm process, benchmarks/bench_memory.py).
        """
        if value is None:
            return None
        if isinstance(value, dict):
            return {key: self._to_numpy(value.pop(key)) for key in list(value)}
        if isinstance(value, list):
            items = []
            value.reverse()
            while value:
                items.append(self._to_numpy(value.pop()))
            return items
        if isinstance(value, tuple):
            return tuple(self._to_numpy(item) for item in value)
        return self._adapter.to_numpy(value)

    def _warn_about_probes(
        self,
        model: keras.Model,
        unreached: list[str],
        differentiable: dict[str, bool],
        in_place: bool = False,
    ) -> None:
        if processes().index() != 0:
            return  # warned once, by process 0 (the same on every process)
        what = "Layer" if in_place else "GradientProbe"
        for name in unreached:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"{what} '{name}' of model '{model.name}' was not "
                    "reached by the forward pass, so it has no activation or "
                    "gradient. Check that it is called in the model's forward "
                    "computation.",
                    stacklevel=4,
                )
        for name, ok in differentiable.items():
            if not ok and name not in self._warned:
                self._warned.add(name)
                fix = (
                    "Select a floating-point layer instead (e.g. the Embedding)."
                    if in_place
                    else "Move the probe after a floating-point layer (e.g. after "
                    "the Embedding)."
                )
                warnings.warn(
                    f"{what} '{name}' of model '{model.name}' outputs a tensor "
                    "that is not floating point (e.g. token ids), so the loss has "
                    f"no gradient with respect to it; its gradient is reported as "
                    f"None. {fix}",
                    stacklevel=4,
                )


_ENGINE_ATTRIBUTE = "_keras_actgrad_engine"


def get_engine(model: keras.Model) -> ProbeEngine:
    """Returns the model's probe engine, creating it on first use.

    The engine lives on the model (a plain attribute, untracked by Keras):
    its compiled functions reference the model, so a global cache keyed by
    the model would keep every probed model alive; on the model, the two
    form a cycle the garbage collector frees with the model.
    """
    engine = model.__dict__.get(_ENGINE_ATTRIBUTE)
    # (A copied model may carry its original's engine: never reuse that.)
    if not isinstance(engine, ProbeEngine) or engine._model_ref() is not model:
        engine = ProbeEngine(model)
        object.__setattr__(model, _ENGINE_ATTRIBUTE, engine)
    return engine


__all__ = ["Adapter", "Batch", "PassResult", "ProbeEngine", "check_model", "get_engine"]
