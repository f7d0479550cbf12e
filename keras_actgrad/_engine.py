"""One forward and one backward pass over a batch, for every probe at once.

The engine is backend-agnostic: it validates the inputs, resolves the loss,
caches one compiled probe function per model and configuration, and turns
results into NumPy. The backend adapters (`_backend_<name>.py`) hold the only
backend-specific code: how a probe output is made differentiable and
recorded, how the gradient is taken, and how the step is compiled.

Every probe pass runs inside a `keras.StatelessScope`: variable assignments
made during it (BatchNormalization moving statistics, seed-generator state,
metric and loss trackers) are collected by the scope and dropped, so a probe
pass never changes the model, whatever `training` is.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeAlias

import keras
import numpy as np

from keras_actgrad._context import tapping
from keras_actgrad._probe import GradientProbe, _is_graph_model, find_probes

Tensor: TypeAlias = Any
LossSpec: TypeAlias = str | Callable[..., Any]
LossFn: TypeAlias = Callable[[Any, Any, Any, Any], Tensor]

_NAMED_LOSSES = ("model", "sum")
# Compiled probe functions kept per model (least recently used dropped).
MAX_COMPILED_FUNCTIONS = 16


@dataclasses.dataclass(frozen=True)
class ActivationGradient:
    """A probe's activation and the gradient of the loss with respect to it.

    Attributes:
        activation: NumPy array, the probe's output on the batch, or `None`
            if the forward pass never reached the probe.
        gradient: NumPy array of the same shape, d loss / d activation as it
            flows back through the probe, or `None` where the probe is not
            connected to the loss (or its tensor is not floating point).
    """

    activation: np.ndarray | None
    gradient: np.ndarray | None


@dataclasses.dataclass
class Tapped:
    """What a probe pass recorded at one probe (backend tensors)."""

    name: str
    activation: Tensor
    differentiable: bool
    handle: Tensor = None  # what the adapter differentiates with respect to


class TapRecorder:
    """Names the probe visits of one pass and records what each one tapped.

    A probe reached twice in one pass is named `name`, then `name@1`, ... A
    tensor that is not floating point is recorded as not differentiable and
    passed through unchanged; a floating point one is replaced by
    `make_handle(tensor)`, the backend's differentiable stand-in for it,
    which is recorded as both activation and handle.

    Args:
        is_float: callable, whether a tensor is floating point.
        make_handle: callable, the tensor the backend differentiates with
            respect to and passes on downstream of the probe.
    """

    def __init__(
        self,
        is_float: Callable[[Tensor], bool],
        make_handle: Callable[[Tensor], Tensor],
    ) -> None:
        self.tapped: list[Tapped] = []
        self._is_float = is_float
        self._make_handle = make_handle
        self._calls: dict[str, int] = {}

    def tap(self, probe: Any, tensor: Tensor) -> Tensor:
        """The tap installed by `forward`: records `tensor`, returns its stand-in."""
        count = self._calls.get(probe.name, 0)
        self._calls[probe.name] = count + 1
        name = probe.name if count == 0 else f"{probe.name}@{count}"
        if not self._is_float(tensor):
            self.tapped.append(Tapped(name, tensor, False))
            return tensor
        handle = self._make_handle(tensor)
        self.tapped.append(Tapped(name, handle, True, handle))
        return handle


class Reducer(Protocol):
    """Turns the pass's tensors into what leaves the device.

    Called inside the compiled function. `key` must identify the reduction
    (it keys the cache of compiled functions).
    """

    @property
    def key(self) -> Hashable: ...

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
    ) -> Any: ...


class FullReducer:
    """Returns activations and gradients whole (for `activation_gradients`)."""

    key: Hashable = "full"

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
    ) -> Any:
        return {
            "activations": activations,
            "gradients": gradients,
            "weight_gradients": weight_gradients,
            "loss": loss,
        }


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Everything, besides the data, that fixes a compiled probe function."""

    loss: LossSpec
    training: bool
    weight_gradients: bool
    reducer: Reducer

    @property
    def key(self) -> Hashable:
        return (
            _loss_key(self.loss),
            self.training,
            self.weight_gradients,
            self.reducer.key,
        )


def _loss_key(loss: LossSpec) -> Hashable:
    return loss if isinstance(loss, str) else ("callable", id(loss))


def _accepts_training(fn: Callable[..., Any]) -> bool:
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _FunctionLoss(keras.losses.Loss):
    """A loss function as a `keras.losses.Loss`: sample weights, reduction.

    (`keras.losses.LossFunctionWrapper` is not part of the public API.)
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        super().__init__(name=getattr(function, "__name__", "loss"))
        self.function = function

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.function(y_true, y_pred)


def resolve_loss(model: keras.Model, loss: LossSpec, training: bool) -> LossFn:
    """Returns `fn(x, y, y_pred, sample_weight) -> scalar` for `loss`."""
    if isinstance(loss, str) and loss == "model":
        with_training = _accepts_training(model.compute_loss)

        def model_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
            if with_training:
                return model.compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=training,
                )
            return model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight
            )

        return model_loss
    if isinstance(loss, str) and loss == "sum":

        def sum_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
            total = 0.0
            for output in keras.tree.flatten(y_pred):
                total = total + keras.ops.sum(keras.ops.cast(output, "float32"))
            return total

        return sum_loss
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            resolved = None
        if resolved is None:
            raise ValueError(
                f"Unknown `loss`: '{loss}'. Expected 'model' (the compiled "
                "training loss), 'sum' (the sum of all model outputs), a Keras "
                "loss name such as 'mse' or 'categorical_crossentropy', or a "
                "callable `loss(y_true, y_pred) -> scalar`. "
                f"Accepted strings: {list(_NAMED_LOSSES)} and Keras loss names. "
                f"Received: loss='{loss}'."
            )
        loss = resolved
    if not callable(loss):
        raise ValueError(
            "`loss` must be 'model', 'sum', a Keras loss name, or a callable "
            f"`loss(y_true, y_pred) -> scalar`. Received: loss={loss!r}."
        )
    loss_object = loss if isinstance(loss, keras.losses.Loss) else _FunctionLoss(loss)

    function = loss

    def callable_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
        if y is not None or isinstance(function, keras.losses.Loss):
            return loss_object(y, y_pred, sample_weight=sample_weight)
        # A label-free objective such as a class score: `fn(None, y_pred)`,
        # averaged over the batch (weighted by `sample_weight` if given).
        values = keras.ops.convert_to_tensor(function(None, y_pred))
        if sample_weight is not None and len(values.shape) > 0:
            weights = keras.ops.cast(sample_weight, values.dtype)
            weights = keras.ops.reshape(weights, (-1,) + (1,) * (len(values.shape) - 1))
            values = values * weights
        return keras.ops.mean(values)

    return callable_loss


def needs_labels(loss: LossSpec) -> bool:
    """Whether `loss` needs `y` (plain callables may ignore `y_true`)."""
    if isinstance(loss, str):
        return loss != "sum"
    return isinstance(loss, keras.losses.Loss)


def _as_arrays(data: Any) -> Any:
    """Nested Python lists of numbers become NumPy arrays, as in `fit`.

    (A `tf.function` would otherwise treat every number as a constant and
    retrace for each new value.)
    """
    if isinstance(data, dict):
        return {key: _as_arrays(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        leaves = keras.tree.flatten(data)
        if leaves and all(isinstance(v, (bool, int, float, np.number)) for v in leaves):
            try:
                return np.asarray(data)
            except ValueError:  # ragged: leave it to the model to complain
                return data
        return type(data)(_as_arrays(value) for value in data)
    return data


def standardize(data: Any) -> Any:
    """Converts NumPy float64 leaves to `floatx()`, as Keras data adapters do.

    Nested Python lists of numbers are converted to arrays first.
    """
    if data is None:
        return None
    data = _as_arrays(data)
    floatx = keras.config.floatx()

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) and leaf.dtype == np.float64:
            return leaf.astype(floatx)
        return leaf

    return keras.tree.map_structure(convert, data)


def _shape(value: Any) -> tuple[Any, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def describe(data: Any) -> str:
    """A short description of a (nested) batch, for error messages."""
    if data is None:
        return "None"
    if isinstance(data, dict):
        return "{" + ", ".join(f"'{k}': {describe(v)}" for k, v in data.items()) + "}"
    if isinstance(data, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in data) + "]"
    shape = _shape(data)
    if shape is not None:
        return f"array of shape {shape} and dtype {getattr(data, 'dtype', '?')}"
    return f"{type(data).__name__}"


def batch_size(x: Any) -> int | None:
    for leaf in keras.tree.flatten(x):
        shape = _shape(leaf)
        if shape:
            return int(shape[0]) if shape[0] is not None else None
    return None


def _declared_inputs(model: keras.Model) -> Any:
    """The model's input structure (`KerasTensor`s), or None if unknown.

    `Sequential.input` fails until the model has been called on data, so a
    Sequential model's single input comes from `inputs`.
    """
    if not _is_graph_model(model):
        return None
    try:
        inputs = model.inputs
    except AttributeError:
        return None
    if not inputs:
        return None
    if isinstance(model, keras.Sequential):
        return inputs[0]
    return model.input


def check_inputs(model: keras.Model, x: Any) -> None:
    """Checks `x` against the model's declared inputs, before any tracing."""
    if x is None:
        raise ValueError(
            f"The probe batch `x` is None. Pass the inputs of model '{model.name}' "
            "as `fit` takes them (an array, a list or a dict of arrays). "
            "Received: x=None."
        )
    for leaf in keras.tree.flatten(x):
        if _shape(leaf) is None and not isinstance(leaf, (bool, int, float)):
            raise ValueError(
                f"The probe batch must be arrays (one batch, as `model(x)` takes "
                f"it), not a {type(leaf).__name__}. A dataset or generator holds "
                "many batches: take one first, e.g. "
                "`x, y = next(iter(dataset))`. "
                f"Received: x={describe(x)}."
            )
    size = batch_size(x)
    if size == 0:
        raise ValueError(
            "The probe batch is empty: it has 0 examples. Pass at least one "
            f"example. Received: x={describe(x)}."
        )
    declared = _declared_inputs(model)
    if declared is None:
        return
    specs = keras.tree.flatten(declared)
    if isinstance(x, dict) and isinstance(declared, dict):
        missing = sorted(set(declared) - set(x))
        if missing:
            raise ValueError(
                f"The probe batch is missing inputs {missing} of model "
                f"'{model.name}'. Expected a dict with keys "
                f"{sorted(declared)}. Received: x={describe(x)}."
            )
        leaves = [x[name] for name in declared]
        specs = [declared[name] for name in declared]
    elif isinstance(x, dict) and all(
        getattr(spec, "name", None) in x for spec in specs
    ):
        # A dict keyed by input names, for inputs declared as a list.
        leaves = [x[spec.name] for spec in specs]
    else:
        leaves = keras.tree.flatten(x)
    if len(leaves) != len(specs):
        raise ValueError(
            f"Model '{model.name}' takes {len(specs)} input(s) but the probe batch "
            f"holds {len(leaves)} array(s). Expected inputs of shapes "
            f"{[tuple(s.shape) for s in specs]}. Received: x={describe(x)}."
        )
    for spec, leaf in zip(specs, leaves, strict=True):
        shape = _shape(leaf)
        expected = tuple(spec.shape)
        if shape is None:
            continue
        if len(shape) != len(expected) or any(
            e is not None and e != s
            for e, s in zip(expected[1:], shape[1:], strict=True)
        ):
            raise ValueError(
                f"The probe batch does not fit model '{model.name}': input "
                f"'{getattr(spec, 'name', '?')}' expects shape {expected} "
                f"(None is the batch axis), but the array given for it has "
                f"shape {shape}. Pass arrays shaped like the model's inputs, "
                f"as `fit` takes them. Received: x={describe(x)}."
            )
        kind = getattr(getattr(leaf, "dtype", None), "kind", None)
        if _is_numeric_spec(spec) and kind is not None and kind not in "biuf":
            raise ValueError(
                f"The probe batch does not fit model '{model.name}': input "
                f"'{getattr(spec, 'name', '?')}' expects numbers of dtype "
                f"{spec.dtype}, but the array given for it has dtype "
                f"{leaf.dtype}, which cannot be converted to it. Pass numeric "
                f"arrays (e.g. `x.astype('{spec.dtype}')`). "
                f"Received: x={describe(x)}."
            )


def _declared_outputs(model: keras.Model) -> list[tuple[Any, ...]] | None:
    if not _is_graph_model(model):
        return None
    try:
        return [tuple(output.shape) for output in keras.tree.flatten(model.outputs)]
    except (AttributeError, ValueError):
        return None


def _is_numeric_spec(spec: Any) -> bool:
    dtype = str(getattr(spec, "dtype", ""))
    return dtype == "bool" or dtype.startswith(("int", "uint", "float", "bfloat"))


def check_labels(y: Any, sample_weight: Any, loss: LossSpec) -> None:
    """Checks that `y` and `sample_weight` hold numbers."""
    if not needs_labels(loss):
        return
    for argument, value in (("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(value) if value is not None else []:
            kind = getattr(getattr(leaf, "dtype", None), "kind", None)
            if kind is not None and kind not in "biuf":
                raise ValueError(
                    f"`{argument}` must hold numbers, but it has an array of "
                    f"dtype {leaf.dtype}. Encode labels as numbers (e.g. class "
                    f"indices) as `fit` needs them. Received: "
                    f"{argument}={describe(value)}."
                )


def check_batch_sizes(x: Any, y: Any, sample_weight: Any) -> None:
    """Checks that x, y and sample_weight hold the same number of examples."""
    sizes: dict[str, set[int]] = {}
    for label, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(data) if data is not None else []:
            shape = _shape(leaf)
            if shape and shape[0] is not None:
                sizes.setdefault(label, set()).add(int(shape[0]))
    found = set().union(*sizes.values()) if sizes else set()
    if len(found) > 1:
        counts = ", ".join(f"{label}: {sorted(n)}" for label, n in sizes.items())
        raise ValueError(
            "The arrays of the probe batch hold different numbers of examples "
            f"({counts}). Every array in `x`, `y` and `sample_weight` needs the "
            "same first (batch) dimension. "
            f"Received: x={describe(x)}, y={describe(y)}, "
            f"sample_weight={describe(sample_weight)}."
        )


def check_model(model: keras.Model, loss: LossSpec, y: Any) -> list[GradientProbe]:
    """Checks what a probe pass needs of the model; returns its probes."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' has not been built yet, so it has no weights "
            "to probe. Build it first: give it an input shape "
            "(`keras.Input(...)`), call it on a batch, or call `model.build(...)`. "
            f"Received: model '{model.name}' with built=False."
        )
    probes = find_probes(model)
    if not probes:
        raise ValueError(
            f"No `GradientProbe` found in model '{model.name}'. Add probes with "
            "`model = keras_actgrad.insert_probes(model)` or place "
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


class Adapter(Protocol):
    """What a backend provides to the engine."""

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[[Any, Any, Any], Any]: ...

    def to_numpy(self, value: Any) -> np.ndarray: ...


def _adapter() -> Adapter:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_actgrad._backend_tensorflow import TensorFlowAdapter

        return TensorFlowAdapter()
    if backend == "jax":
        from keras_actgrad._backend_jax import JaxAdapter

        return JaxAdapter()
    if backend == "torch":
        from keras_actgrad._backend_torch import TorchAdapter

        return TorchAdapter()
    raise NotImplementedError(
        f"keras-actgrad supports the 'tensorflow', 'jax' and 'torch' Keras "
        f"backends. Received: KERAS_BACKEND='{backend}'."
    )


def probe_scope(model: keras.Model) -> keras.StatelessScope:
    """The scope a probe pass runs in (enter it inside the traced function).

    It collects `add_loss` losses and drops every state update. Keras reads a
    regularized weight from the scope's state mapping when it computes
    regularization losses in a stateless scope, so those weights are mapped
    to their current values (without this, `compute_loss` fails on models
    with a `kernel_regularizer`).
    """
    regularized = [
        (variable, variable)
        for variable in model.trainable_weights
        if variable.regularizer is not None
    ]
    return keras.StatelessScope(state_mapping=regularized, collect_losses=True)


DEFAULT_LOSS_SCALE = 2.0**15
SCALE_DIVISOR = 16.0


def loss_scale(model: keras.Model) -> float:
    """The loss scale of a float16 probe pass: the optimizer's, if it has one.

    Every adapter scales the backward pass of a pass with float16 probes by
    this, divides it by `SCALE_DIVISOR` while the gradients overflow (down to
    1), and unscales in float32.
    """
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if optimizer.built:
            return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
        return float(optimizer.initial_scale)
    return DEFAULT_LOSS_SCALE


def forward(
    model: keras.Model, x: Any, training: bool, tap: Callable[[Any, Any], Any]
) -> Any:
    """The model's forward pass with probes tapped (call inside a scope)."""
    with tapping(tap):
        return model(x, training=training)


class ProbeEngine:
    """Compiled probe passes of one model, cached per configuration.

    Backend frameworks retrace a compiled function once per new input
    signature; `trace_count` counts those traces (useful to check reuse).
    """

    def __init__(self, model: keras.Model) -> None:
        self._model_ref = weakref.ref(model)
        self._adapter = _adapter()
        self._functions: collections.OrderedDict[
            Hashable, Callable[[Any, Any, Any], Any]
        ] = collections.OrderedDict()
        self.trace_count = 0
        self.probe_order: list[str] = []
        # The model's probes as the last `run` found them (in `check_model`).
        self.probes: list[GradientProbe] = []
        self.differentiable: dict[str, bool] = {}
        self._traced: dict[Hashable, tuple[list[str], dict[str, bool]]] = {}
        self._warned: set[str] = set()

    @property
    def model(self) -> keras.Model:
        model = self._model_ref()
        if model is None:  # pragma: no cover - engines die with their model
            raise RuntimeError("The model of this probe engine was deleted.")
        return model

    @property
    def adapter(self) -> Adapter:
        return self._adapter

    def _on_trace(self, key: Hashable, tapped: list[Tapped]) -> None:
        self.trace_count += 1
        self._traced[key] = (
            [t.name for t in tapped],
            {t.name: t.differentiable for t in tapped},
        )
        self._use_trace(key)

    def _use_trace(self, key: Hashable) -> None:
        # The probes a pass reaches can depend on the configuration (a
        # subclassed model's `call` may branch on `training`), so the order
        # is that of the function that just ran, not of the last trace.
        order, differentiable = self._traced.get(key, ([], {}))
        self.probe_order = list(order)
        self.differentiable = dict(differentiable)

    def function(self, config: PassConfig) -> Callable[[Any, Any, Any], Any]:
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

    def run(self, x: Any, y: Any, sample_weight: Any, config: PassConfig) -> Any:
        """Runs one probe pass; returns the reducer's output (backend tensors)."""
        model = self.model
        self.probes = check_model(model, config.loss, y)
        x, y, sample_weight = standardize(x), standardize(y), standardize(sample_weight)
        check_inputs(model, x)
        check_batch_sizes(x, y, sample_weight)
        check_labels(y, sample_weight, config.loss)
        function = self.function(config)
        try:
            result = function(x, y, sample_weight)
        except (ValueError, TypeError, RuntimeError) as error:
            # A failed trace never reaches `on_trace`, so `trace_count` cannot
            # tell a trace-time error from a run-time one: wrap them all.
            # PyTorch reports shape mismatches as RuntimeError.
            if isinstance(error, RuntimeError) and keras.backend.backend() != "torch":
                raise
            outputs = _declared_outputs(model)
            raise ValueError(
                f"The probe pass of model '{model.name}' failed: {error}\n"
                "Check that `x` and `y` are shaped as `fit` takes them for this "
                "model and that the loss fits its outputs"
                + ("" if outputs is None else f" (output shapes: {outputs})")
                + ". "
                f"Received: x={describe(x)}, y={describe(y)}, "
                f"sample_weight={describe(sample_weight)}, loss={config.loss!r}."
            ) from error
        self._use_trace(config.key)
        self._warn_about_probes(model)
        return result

    def _warn_about_probes(self, model: keras.Model) -> None:
        reached = set(self.probe_order)
        for probe in self.probes:
            if probe.name not in reached and probe.name not in self._warned:
                self._warned.add(probe.name)
                warnings.warn(
                    f"GradientProbe '{probe.name}' of model '{model.name}' was not "
                    "reached by the forward pass, so it has no activation or "
                    "gradient. Check that it is called in the model's forward "
                    "computation.",
                    stacklevel=4,
                )
        for name, ok in self.differentiable.items():
            if not ok and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"GradientProbe '{name}' of model '{model.name}' sees a tensor "
                    "that is not floating point (e.g. token ids), so the loss has "
                    "no gradient with respect to it; its gradient is reported as "
                    "None. Move the probe after a floating-point layer (e.g. after "
                    "the Embedding).",
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


def _half_to_float32(array: np.ndarray) -> np.ndarray:
    """Gradients of float16 / bfloat16 probes are returned as float32."""
    if array.dtype.itemsize == 2 and array.dtype.kind in "fV":
        return array.astype(np.float32)
    return array


def activation_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    loss: LossSpec = "model",
    sample_weight: Any = None,
    training: bool = False,
) -> dict[str, ActivationGradient]:
    """Every probe's activation and the gradient of the loss with respect to it.

    One forward and one backward pass over the batch, compiled once per input
    signature and reused. The gradient at a probe is d loss / d (probe
    output): what flows back through the probe, as a backward hook on it
    would see. Nothing about the model changes: no weight, BatchNormalization
    statistic, optimizer slot or random-generator state moves.

    Args:
        model: A built Keras model with `GradientProbe` layers.
        x: Inputs, as `fit` takes them: an array, a list or a dict of arrays.
        y: Labels, as `fit` takes them. Needed unless `loss="sum"` or `loss`
            is a plain function that ignores `y_true` (it then gets `None`).
        loss: `"model"` (the compiled training loss, regularization
            included), `"sum"` (the sum of all model outputs, no labels), a
            Keras loss name, or a callable `loss(y_true, y_pred) -> scalar`
            (any Keras loss object or function). Defaults to `"model"`.
        sample_weight: Optional per-example weights for the loss.
        training: Whether layers run in training mode (Dropout on,
            BatchNormalization on batch statistics). State updates are
            discarded either way. Defaults to `False`.

    Returns:
        A dict from probe name to `ActivationGradient`, in the order the
        forward pass reaches the probes (probes it never reaches last, with
        `None` fields).

    Raises:
        ValueError: for a model without probes, an unbuilt or uncompiled
            model (with `loss="model"`), missing labels, inputs of the wrong
            shape, an empty batch, or an unknown loss.

    Example:

    ```python
    results = keras_actgrad.activation_gradients(model, x, y)
    for name, result in results.items():
        print(name, np.linalg.norm(result.gradient))
    ```
    """
    engine = get_engine(model)
    config = PassConfig(
        loss=loss,
        training=bool(training),
        weight_gradients=False,
        reducer=FullReducer(),
    )
    out = engine.run(x, y, sample_weight, config)
    to_numpy = engine.adapter.to_numpy
    results: dict[str, ActivationGradient] = {}
    for name in engine.probe_order:
        activation = out["activations"][name]
        gradient = out["gradients"].get(name)
        results[name] = ActivationGradient(
            activation=to_numpy(activation),
            gradient=None if gradient is None else _half_to_float32(to_numpy(gradient)),
        )
    for probe in engine.probes:
        if probe.name not in results:
            results[probe.name] = ActivationGradient(activation=None, gradient=None)
    return results
