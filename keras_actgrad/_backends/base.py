"""The adapter contract: what a backend provides to the engine.

An adapter compiles a *pass*: the model's forward pass with its taps
recorded (`TapRecorder`), the loss, the backward pass to every tap (and to
the trainable weights, if asked), and a reducer applied on the device. It
also turns backend tensors into NumPy and names its native moments class.
Everything here is backend-neutral (`keras.ops`); the adapters
(`tensorflow.py`, `jax.py`, `torch.py`) hold the only backend-specific code
and import nothing above this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeAlias, runtime_checkable

import keras
import numpy as np

from keras_actgrad._layers import Site, selection_key, taps_in
from keras_actgrad._statistics.moments import Moments
from keras_actgrad._training_loss import TrainingLoss

Tensor: TypeAlias = Any
LossSpec: TypeAlias = str | Callable[..., Any]
# `loss_fn(x, y, y_pred, sample_weight) -> scalar`, as resolved by the engine.
LossFn: TypeAlias = Callable[[Any, Any, Any, Any], Tensor]


@dataclasses.dataclass
class Tapped:
    """What a pass recorded at one tap (backend tensors)."""

    name: str
    activation: Tensor
    differentiable: bool
    handle: Tensor = None  # what the adapter differentiates with respect to


class TapRecorder:
    """Names the tap visits of one pass and records what each one tapped.

    A tap reached twice in one pass is named `name`, then `name@1`, ... A
    tensor that is not floating point is recorded as not differentiable and
    passed through unchanged; a floating point one is replaced by
    `make_handle(tensor)`, the backend's differentiable stand-in for it,
    which is recorded as both activation and handle.

    Args:
        is_float: callable, whether a tensor is floating point.
        make_handle: callable, the tensor the backend differentiates with
            respect to and passes on downstream of the tap.
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
    (it keys the cache of compiled functions). A reducer that reads tensors
    given to the pass (`ProbeEngine.run(..., inputs=...)`: histogram ranges,
    sums carried from one chunk of a batch to the next) also takes them as
    `inputs=`; they are inputs of the compiled function, so new values do not
    retrace it (see `reduce`).
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


def reduce(
    reducer: Reducer,
    activations: dict[str, Tensor],
    gradients: dict[str, Tensor | None],
    weight_gradients: dict[str, Tensor | None],
    loss: Tensor,
    inputs: Any = None,
) -> Any:
    """Calls `reducer` in a pass, with the pass's `inputs` if it has any."""
    if inputs is None:
        return reducer(activations, gradients, weight_gradients, loss)
    call: Any = reducer
    return call(activations, gradients, weight_gradients, loss, inputs=inputs)


@runtime_checkable
class ProbeReducer(Reducer, Protocol):
    """A reducer that can reduce each probe on its own, in two shares, then combine.

    `reduce_activation(activation)` is one probe's activation share of the
    output, `reduce_gradient(gradient)` its gradient share (`None`: no
    gradient reached the probe), each a list of tensors;
    `combine({name: activation share}, {name: gradient share},
    weight_gradients)` the output, equal to `__call__` on the whole pass. An
    adapter may reduce the activation share at the tap in the forward pass
    and the gradient share inside the backward pass, as soon as the
    gradient exists, so that neither the activation nor the gradient is
    kept alive for the reductions (see the TensorFlow adapter).
    """

    def reduce_activation(self, activation: Tensor) -> list[Any]: ...

    def reduce_gradient(self, gradient: Tensor | None) -> list[Any]: ...

    def combine(
        self,
        activations: dict[str, list[Any]],
        gradients: dict[str, list[Any]],
        weight_gradients: dict[str, Tensor | None],
    ) -> Any: ...


def _loss_key(loss: LossSpec) -> Hashable:
    return loss if isinstance(loss, str) else ("callable", id(loss))


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Everything, besides the data, that fixes a compiled pass."""

    loss: LossSpec
    training: bool
    weight_gradients: bool
    reducer: Reducer
    # Layers measured in place (`layers=`); empty: the model's probes.
    sites: tuple[Site, ...] = ()

    @property
    def key(self) -> Hashable:
        return (
            _loss_key(self.loss),
            self.training,
            self.weight_gradients,
            self.reducer.key,
            selection_key(self.sites),
        )


class Adapter(Protocol):
    """What a backend provides to the engine."""

    # The backend's moments (a `Moments` subclass with native ops, or
    # `Moments` itself).
    moments: type[Moments]

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[..., Any]:
        """Returns `run(x, y, sample_weight, inputs=None) -> reducer output`.

        `inputs` (a nested structure of tensors, or None) is given to the
        reducer (see `reduce`) as an input of the compiled function.
        `on_trace(tapped)` is called whenever the pass is traced (once per
        new input signature), with the taps it recorded, in forward order.
        """
        ...

    def to_numpy(self, value: Any) -> np.ndarray: ...


def probe_scope(model: keras.Model) -> keras.StatelessScope:
    """The scope a pass runs in (enter it inside the traced function).

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


def forward(
    model: keras.Model,
    x: Any,
    training: bool,
    tap: Callable[[Any, Any], Any],
    sites: tuple[Site, ...] = (),
    loss: Any = None,
) -> Any:
    """The model's forward pass with its taps recorded (call inside a scope).

    The taps are the model's `GradientProbe`s, or, if `sites` are given,
    the outputs of those layers only (the probes then pass through). With
    a `TrainingLoss` (`loss`), its function is the forward pass (`x` is
    the packed batch) and its loss is returned.
    """

    def run() -> Any:
        if isinstance(loss, TrainingLoss):
            return loss(model, x)
        return model(x, training=training)

    with taps_in(model, sites, tap):
        return run()


# Mixed precision: the loss scale of a pass with float16 taps.
DEFAULT_LOSS_SCALE = 2.0**15
SCALE_DIVISOR = 16.0


def loss_scale(model: keras.Model) -> float:
    """The loss scale of a float16 pass: the optimizer's, if it has one.

    Every adapter scales the backward pass of a pass with float16 taps by
    this (see `loss_scaled`).
    """
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if optimizer.built:
            return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
        return float(optimizer.initial_scale)
    return DEFAULT_LOSS_SCALE


def to_float32(gradient: Tensor | None) -> Tensor | None:
    """Gradients of float16 and bfloat16 tensors are cast to float32."""
    if gradient is None:
        return None
    if keras.backend.standardize_dtype(gradient.dtype) in ("float16", "bfloat16"):
        return keras.ops.cast(gradient, "float32")
    return gradient


def loss_scaled(
    compute: Callable[[Tensor], list[Tensor]],
    scale: Tensor,
    first: list[Tensor] | None = None,
) -> list[Tensor]:
    """Loss-scaled gradients, unscaled in float32, with the scale backed off.

    `compute(scale)` returns the float32 gradients of the loss with the
    backward pass seeded with `scale` (no `None`). While they overflow (a
    non-finite entry) and the scale is above 1, the scale is divided by
    `SCALE_DIVISOR`, as `keras.optimizers.LossScaleOptimizer` does; a
    gradient still non-finite at scale 1 is non-finite in truth and is
    returned as is. `first`, if given, is `compute(scale)` already
    computed. One compiled loop on every backend (`keras.ops.while_loop`).
    """
    ops = keras.ops

    def all_finite(grads: list[Tensor]) -> Tensor:
        return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))

    def overflowing(current: Tensor, grads: list[Tensor]) -> Tensor:
        return ops.logical_and(current > 1.0, ops.logical_not(all_finite(grads)))

    def smaller(current: Tensor, grads: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        current = ops.maximum(current / SCALE_DIVISOR, 1.0)
        return current, compute(current)

    scale = ops.convert_to_tensor(scale, "float32")
    if first is None:
        first = compute(scale)
    if not first:
        return first
    final, grads = ops.while_loop(overflowing, smaller, (scale, first))
    return [g / final for g in grads]


class StepHooks(Protocol):
    """What a backend provides to the monitored training step (`_engine.step`).

    `stateless` is True where Keras's train step is a pure function of
    `(state, data)` (JAX): the optimizer is observed through
    `stateless_apply` there, through `apply` elsewhere.
    """

    stateless: bool
    # What a train function raises when its data runs out.
    end_of_data: tuple[type[BaseException], ...]

    @staticmethod
    def identity(
        tensor: Tensor,
        on_gradient: Callable[[Tensor, Tensor], None],
        on_forward: Callable[[Tensor], None],
    ) -> Tensor:
        """`tensor`, unchanged, whose backward pass calls `on_gradient(a, g)`.

        `a` is the tensor, `g` the gradient flowing back into it, which is
        passed on untouched. `on_gradient` builds the reductions in the
        backward pass of the step being traced (or run, eagerly).
        `on_forward(a)` is called in the forward pass with a handle of the
        tensor that the step may still read after its backward pass (where
        `readable` says so): the activation of a tap that no gradient
        reaches (its `on_gradient` is never called). Calling it reads
        nothing.
        """
        ...

    @staticmethod
    def backward_functions() -> list[tuple[Any, str, str]]:
        """The functions a custom `train_step` takes a backward pass with.

        `(owner, attribute, kind)`, wrapped on `owner` while a custom step
        is traced so that its passes are told apart; `kind` as in
        `_engine.step._wrap_backward` (`"call"`, `"transform"`, `"vjp"`).
        """
        ...

    @staticmethod
    def readable(activation: Tensor) -> bool:
        """Whether a handle given to `on_forward` may be read here.

        False for a tensor of an inner trace (e.g. a loop's body) that the
        step's own trace cannot use.
        """
        ...

    @staticmethod
    def copy(value: Tensor) -> Tensor:
        """A copy of a variable's value that a later assignment does not change."""
        ...

    @staticmethod
    def make_train_function(
        model: keras.Model, train_step: Callable[..., Any]
    ) -> Callable[..., Any]:
        """`train_step`, compiled as Keras compiles the model's own train step."""
        ...

    @staticmethod
    def reductions(jit: bool) -> Callable[..., Any]:
        """`reductions(name, fn, *tensors)`, which returns `fn(*tensors)`.

        Where the backend can, traced once per `name` and signature of the
        tensors and shared by the probes of the same shape (TensorFlow's
        `SharedReductions`); elsewhere `call_directly`. `jit`: the step is
        compiled with XLA.
        """
        ...


def call_directly(name: str, fn: Callable[..., Any], *tensors: Any) -> Any:
    """`StepHooks.reductions` where nothing is shared: `fn(*tensors)`."""
    return fn(*tensors)


class Replicas(Protocol):
    """How the monitored step combines the replicas' shares of the batch.

    Under `tf.distribute.MirroredStrategy` each replica runs the step on its
    share (`replicas_tensorflow.py`); elsewhere one program sees the global
    batch (JAX's `keras.distribution` shards arrays inside one `jit`), and
    `gather` and `sum` return their arguments (`OneProgram`).
    """

    @staticmethod
    def gather(activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
        """A tap's activation and gradient over the global batch."""
        ...

    @staticmethod
    def sum(gradients: list[Tensor]) -> list[Tensor]:
        """The weight gradients summed over the replicas, as the optimizer does."""
        ...

    @staticmethod
    def unsupported(model: keras.Model) -> str | None:
        """A distributed setup the monitor cannot combine, described; else None."""
        ...


class OneProgram:
    """`Replicas` where one program computes the global batch: nothing to do."""

    @staticmethod
    def gather(activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
        return activation, gradient

    @staticmethod
    def sum(gradients: list[Tensor]) -> list[Tensor]:
        return gradients

    @staticmethod
    def unsupported(model: keras.Model) -> str | None:
        return None


class Processes(Protocol):
    """Several processes running one distributed program (multi-host JAX).

    `processes_jax.py` implements it for JAX; elsewhere (`OneProcess`) a
    program runs in one process and every function is the identity (a
    multi-worker `tf.distribute` run has its own chief: `writes_summaries`).
    """

    @staticmethod
    def count() -> int:
        """The number of processes."""
        ...

    @staticmethod
    def index() -> int:
        """This process's index: 0 writes the summaries and gives the warnings."""
        ...

    @staticmethod
    def spanning() -> bool:
        """Whether the processes run one distribution over all of them."""
        ...

    @staticmethod
    def unsupported() -> str | None:
        """Several processes that do not run one global program, described."""
        ...

    @staticmethod
    def global_batch(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        """The global batch from each process's share (or the same batch)."""
        ...

    @staticmethod
    def place(leaf: Any) -> Any:
        """A NumPy leaf of the global batch on the devices of every process."""
        ...

    @staticmethod
    def replicated(tree: Any) -> Any:
        """Inside a compiled pass: the arrays of `tree` on every device."""
        ...


class OneProcess:
    """`Processes` of one process."""

    @staticmethod
    def count() -> int:
        return 1

    @staticmethod
    def index() -> int:
        return 0

    @staticmethod
    def spanning() -> bool:
        return False

    @staticmethod
    def unsupported() -> str | None:
        return None

    @staticmethod
    def global_batch(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        return x, y, sample_weight

    @staticmethod
    def place(leaf: Any) -> Any:
        return leaf

    @staticmethod
    def replicated(tree: Any) -> Any:
        return tree


def keras_train_function(
    model: keras.Model, train_step: Callable[..., Any]
) -> Callable[..., Any]:
    """Keras's own compilation of `train_step` (TensorFlow and JAX trainers).

    Keras 3.15.1's TensorFlow and JAX trainers build `train_function` in
    `make_train_function(force=True)` from `self.train_step`, read once
    there (`_make_function(self.train_step)`, `jit(self.train_step)`), so
    `train_step` is set on the instance for that call only, and the model's
    own `train_function` is put back.

    The function returned runs **one** step, whatever the model's
    `steps_per_execution`: it is built with `steps_per_execution` set to 1
    (the JAX trainer reads it when it builds the function, the TensorFlow
    trainer when its `tf.function` is traced, on the first call, so there
    it is also 1 during each call). Called as Keras calls its own, it takes
    one batch from the iterator.
    """
    saved = model.train_function
    steps = model.steps_per_execution
    object.__setattr__(model, "train_step", train_step)
    try:
        model.steps_per_execution = 1
        model.make_train_function(force=True)
        function: Callable[..., Any] = model.train_function
    finally:
        model.__dict__.pop("train_step", None)
        model.train_function = saved
        model.steps_per_execution = steps
    if steps == 1:
        return function

    def one_step(*args: Any) -> Any:
        steps = model.steps_per_execution
        model.steps_per_execution = 1
        try:
            return function(*args)
        finally:
            model.steps_per_execution = steps

    return one_step
