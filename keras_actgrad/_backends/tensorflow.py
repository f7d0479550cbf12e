"""The TensorFlow adapter: the only module of the engine that imports TensorFlow.

A probe output is made differentiable by passing it through `tf.identity`
and watching the result on a `tf.GradientTape`: the tape's gradient with
respect to that tensor is the sum over its consumers, which are exactly the
layers downstream of the probe. Consumers of the probe's *input* (skip
branches, the previous layer's activity regularizer) are not counted.

Reduced in the backward pass: when the reducer reduces probe by probe
(`base.ProbeReducer`, the callback's statistics), each tap is a
`tf.custom_gradient` identity instead, whose gradient function reduces the
probe's gradient and passes it on only once the reductions of the tap
reached `BACKWARD_LAG` taps earlier are done; the tape differentiates the
taps' inputs, which only drives the backward pass. At most
`BACKWARD_LAG + 1` probes' gradients then wait for their reductions,
whatever order the executor picks (left free, it let all of them wait,
alive, behind the backward pass: a 48-probe event with histograms took 1.6x
a training step's peak memory, now 1.0x; benchmarks/bench_memory.py). The
lag lets a probe's reductions run beside the next layers' backward ops
(DenseNet121, 242 probes: an event 0.76-0.78x a training step with no lag,
0.74-0.75x with a lag of 4). The gradient is the same tensor either way:
the sum over the probe's consumers. The
activation's share of the statistics (`reduce_activation`) is reduced at
the tap in the forward pass, so the backward pass keeps no activation alive
for the statistics (in ResNet50 the outputs of BatchNormalization, in
inference mode, and of Add, which its own backward pass does not need:
kept for the statistics, they made an event take 1.35x a training step's
peak memory, now 0.46x).

Each probe's two shares (activation, gradient) are reduced by one
out-of-line `tf.function` per shape (`SharedReductions`), traced and
optimized once for all the probes of that shape.

Mixed precision: when a probe sees a float16 tensor, the backward pass is
loss-scaled, as `keras.optimizers.LossScaleOptimizer` does for training, so
small gradients do not underflow to zero in float16. The scale is the model
optimizer's current loss scale if it is a `LossScaleOptimizer`, else
`DEFAULT_LOSS_SCALE`; if the scaled gradients overflow, the scale is divided
by 16 until they are finite (down to 1). Gradients are unscaled in float32,
and gradients of float16 and bfloat16 tensors are returned as float32.

Distribution: the probe pass runs the whole probe batch as one computation
on the worker's default device, outside the replicas, reading the mirrored
weights (identical on every replica). Inside a `strategy.scope()` Keras
divides mean losses by the number of replicas (each replica's share of a
global batch), which would divide the gradients too; there the pass runs in a
helper thread, where no strategy is in scope.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_actgrad._backends.base import (
    LossFn,
    PassConfig,
    ProbeReducer,
    Tapped,
    TapRecorder,
    forward,
    loss_scale,
    loss_scaled,
    probe_scope,
    reduce,
    to_float32,
)
from keras_actgrad._statistics.moments import Moments, xla_compatible
from keras_actgrad._statistics.moments_tensorflow import TensorFlowMoments

# How many taps the backward pass may run ahead of the reductions (see the
# module docstring).
BACKWARD_LAG = 4


def _is_float(tensor: Any) -> bool:
    return bool(getattr(tensor, "dtype", None) is not None and tensor.dtype.is_floating)


def _is_float16(tapped: Tapped) -> bool:
    return tapped.differentiable and tapped.activation.dtype == tf.float16


def _dense(gradient: Any) -> Any:
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def tape_gradients(
    tape: tf.GradientTape, loss: Any, targets: list[Any], scale: Any = None
) -> list[Any]:
    """d loss / d targets in float32 (`None` where not connected).

    With `scale`, the backward pass is loss-scaled (see
    `base.loss_scaled`); `tape` must then be persistent, as an overflow
    recomputes the gradients with a smaller scale.
    """
    found = [
        to_float32(_dense(g))
        for g in tape.gradient(
            loss,
            targets,
            output_gradients=scale,
            unconnected_gradients=tf.UnconnectedGradients.NONE,
        )
    ]
    if scale is None:
        return found
    present = [i for i, g in enumerate(found) if g is not None]
    kept = [targets[i] for i in present]

    def compute(current: Any) -> list[Any]:
        grads = tape.gradient(
            loss,
            kept,
            output_gradients=current,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [to_float32(_dense(g)) for g in grads]

    unscaled = loss_scaled(compute, scale, [found[i] for i in present])
    result: list[Any] = list(found)
    for i, g in zip(present, unscaled, strict=True):
        result[i] = g
    return result


def _tap(tensor: Any, on_gradient: Callable[[Any], Any]) -> Any:
    """`tensor` through an identity whose gradient is `on_gradient(dy)`."""

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def tap(value: Any) -> Any:
        def gradient(dy: Any) -> Any:
            return on_gradient(dy)

        return tf.identity(value), gradient

    return tap(tensor)


class SharedReductions:
    """One `tf.function` per reduction and tensor signature, called in a trace.

    A probe's share of the statistics (its activation's or its gradient's
    moments and histogram) is a few dozen ops, with branches for
    non-finite tensors; written into the pass once per probe, they were
    most of its trace and of the graph TensorFlow optimizes before the
    first run. Probes of the same shape share one function instead, traced
    once: `reductions(name, fn, *tensors)` is `fn(*tensors)`, through the
    function of `(name, the tensors' shapes and dtypes)`; ResNet50's 107
    probes have 10 shapes, 20 share signatures (activation and gradient). Each
    function is kept out of line (`_noinline`): TensorFlow optimizes and
    instantiates its small graph once, and the trace calls it (a call per
    probe; the shares of different probes still run side by side). Under
    XLA (`jit=True`) the calls are inlined into the compiled function.
    Measured (`benchmarks/bench_coldstart.py first`, ResNet50): the first
    probe pass from 2.5x the first `train_on_batch` to 0.4x, its process's
    peak RSS from 2.68 to 1.91 GB.

    One function object per signature, each traced once: TensorFlow's
    retracing warning counts traces per function. `fn` must depend on
    nothing but its tensors and what is fixed for the whole trace.
    """

    def __init__(self, jit: bool) -> None:
        self._attributes = None if jit else {"_noinline": True}
        self._functions: dict[Any, Any] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *tensors: Any) -> Any:
        key = (name, *((tuple(t.shape.as_list()), t.dtype) for t in tensors))
        function = self._functions.get(key)
        if function is None:
            function = tf.function(
                functools.partial(fn),
                autograph=False,
                experimental_attributes=self._attributes,
            )
            self._functions[key] = function
        return function(*tensors)


class TensorFlowAdapter:
    """Builds the pass as one `tf.function`."""

    moments: type[Moments] = TensorFlowMoments

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[..., Any]:
        # The pass is compiled as the model's training step is: with XLA when
        # `model.jit_compile` (Keras's "auto" resolves to True on a machine
        # with a GPU), so that a model that trains under XLA is probed under
        # XLA, with statistics XLA compiles.
        jit = bool(getattr(model, "jit_compile", False)) and not getattr(
            model, "run_eagerly", False
        )

        shared = SharedReductions(jit)

        def step(x: Any, y: Any, sample_weight: Any, scale: Any, inputs: Any) -> Any:
            with xla_compatible(jit):
                return traced(x, y, sample_weight, scale, inputs)

        def traced(x: Any, y: Any, sample_weight: Any, scale: Any, inputs: Any) -> Any:
            reducer = config.reducer
            # A reducer that takes the pass's `inputs` (the chunked one) is
            # called on the whole pass.
            per_probe = isinstance(reducer, ProbeReducer) and inputs is None
            tapped_differentiable: list[Tapped] = []
            # The taps' inputs, in the order the taps are reached (that of
            # the differentiable `tapped`); after the forward pass, whether
            # each probe is reduced inside the backward pass (the tap
            # gradients are traced later, by `tape.gradient`).
            tap_inputs: list[Any] = []
            inside = [False]
            # Per probe: the activation's share, reduced at the tap in the
            # forward pass (by tap index), and the gradient's, reduced in the
            # backward pass (by name).
            forward_shares: list[list[Any]] = []
            reduced: dict[str, list[Any]] = {}
            # The reductions of each tap, in the order the backward pass
            # reaches the taps (that of their gradient functions' tracing).
            pending: list[list[Any]] = []

            def reduce_in_backward(index: int, dy: Any) -> Any:
                if not inside[0]:
                    return dy
                parts = shared(
                    "g",
                    reducer.reduce_gradient,  # type: ignore[attr-defined]
                    to_float32(_dense(dy)),
                )
                reduced[tapped_differentiable[index].name] = parts
                pending.append(tf.nest.flatten(parts))
                lag = BACKWARD_LAG
                if len(pending) <= lag:
                    return tf.identity(_dense(dy))
                # The backward pass goes on past this tap only once the
                # reductions of the tap reached `lag` taps earlier are done:
                # at most `lag + 1` gradients wait for their reductions
                # (alive) while the backward pass produces the next ones.
                with tf.control_dependencies(pending[-1 - lag]):
                    return tf.identity(_dense(dy))

            def watched(tensor: Any) -> Any:
                if per_probe:
                    tape.watch(tensor)
                    index = len(tap_inputs)
                    tap_inputs.append(tensor)
                    # The activation's share now, where the activation
                    # appears: the backward pass then keeps no activation
                    # alive for the statistics (in ResNet50 the outputs of
                    # BatchNormalization and Add, which its own backward pass
                    # does not need). Unused if a float16 tap makes the pass
                    # take the whole-pass path below (pruned from the graph).
                    with tape.stop_recording():
                        forward_shares.append(
                            shared("a", reducer.reduce_activation, tensor)  # type: ignore[attr-defined]
                        )
                    output = _tap(tensor, functools.partial(reduce_in_backward, index))
                else:
                    output = tf.identity(tensor)
                tape.watch(output)
                return output

            recorder = TapRecorder(_is_float, watched)
            tapped = recorder.tapped
            with tf.GradientTape(
                watch_accessed_variables=config.weight_gradients, persistent=True
            ) as tape:
                with probe_scope(model):
                    y_pred = forward(
                        model,
                        x,
                        config.training,
                        recorder.tap,
                        config.sites,
                        config.loss,
                    )
                    loss = tf.cast(loss_fn(x, y, y_pred, sample_weight), tf.float32)
            on_trace(tapped)
            differentiable = [t for t in tapped if t.differentiable]
            tapped_differentiable[:] = differentiable
            variables = (
                list(model.trainable_variables) if config.weight_gradients else []
            )
            float16 = any(_is_float16(t) for t in tapped)
            if per_probe and not float16:
                # Each probe is reduced inside the backward pass, where its
                # gradient appears (see `reduce_in_backward`); the gradients
                # with respect to the taps' inputs only drive that pass.
                inside[0] = True
                grads = tape_gradients(tape, loss, tap_inputs + variables)
                shares = iter(forward_shares)
                activation_shares = {
                    t.name: next(shares)
                    if t.differentiable
                    else reducer.reduce_activation(t.activation)  # type: ignore[attr-defined]
                    for t in tapped
                }
                for t in tapped:
                    if t.name not in reduced:  # not reached by the gradient
                        reduced[t.name] = reducer.reduce_gradient(None)  # type: ignore[attr-defined]
                weight_gradients = {
                    v.path: g
                    for v, g in zip(variables, grads[len(tap_inputs) :], strict=True)
                }
                return reducer.combine(activation_shares, reduced, weight_gradients)  # type: ignore[attr-defined]
            handles = [t.handle for t in differentiable]
            grads = tape_gradients(
                tape, loss, handles + variables, scale if float16 else None
            )
            probe_grads = iter(grads[: len(handles)])
            gradients = {
                t.name: next(probe_grads) if t.differentiable else None for t in tapped
            }
            activations = {t.name: t.activation for t in tapped}
            weight_gradients = {
                v.path: g for v, g in zip(variables, grads[len(handles) :], strict=True)
            }
            # No control dependency on the whole backward pass: each probe's
            # reductions run as soon as its gradient exists, which then dies,
            # instead of every probe's gradient staying alive until the
            # backward pass ends (one more copy of all probe tensors at the
            # peak; benchmarks/bench_memory.py).
            return reduce(
                config.reducer, activations, gradients, weight_gradients, loss, inputs
            )

        # One `tf.function` per compiled pass, traced once per signature.
        # TensorFlow counts retracings per Python code object, so every
        # pass ever compiled in the process (each model, each loss) would
        # add to one count and end in its "retracing ... creating
        # @tf.function repeatedly in a loop" warning, which blames the
        # user. A `functools.partial` has no `__code__`: the count is then
        # per pass, and a retracing warning means what it says. No
        # AutoGraph, as Keras compiles its own train function
        # (`do_not_convert`): the model runs as it trains, and converting
        # every function the trace calls cost more than the trace itself.
        function = tf.function(
            functools.partial(step), autograph=False, jit_compile=jit or None
        )

        def run(x: Any, y: Any, sample_weight: Any, inputs: Any = None) -> Any:
            scale = tf.constant(loss_scale(model), tf.float32)
            if not tf.distribute.has_strategy():
                return function(x, y, sample_weight, scale, inputs)
            if not tf.distribute.in_cross_replica_context():
                raise RuntimeError(
                    "The probe pass cannot run inside `strategy.run` (a replica "
                    "context): it runs the whole probe batch once, outside the "
                    "replicas. Call it from the Python loop, outside "
                    "`strategy.run`. Received: a call in the replica context of "
                    f"{type(tf.distribute.get_strategy()).__name__}."
                )
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(
                    function, x, y, sample_weight, scale, inputs
                ).result()

        return run

    def to_numpy(self, value: Any) -> np.ndarray:
        if hasattr(value, "numpy"):
            return np.asarray(value.numpy())
        return np.asarray(value)


def build_optimizer_before_tracing(model: keras.Model) -> None:
    """Build the model's optimizer now, as Keras does under a strategy.

    Keras's TensorFlow trainer builds the optimizer inside the first trace
    of its train function when no `tf.distribute` strategy is set. The
    optimizer's slot variables are then created while tracing, and
    `tf.function` traces the whole step a second time. Built before the
    first step, the step is traced once. That halves the first `fit`'s
    tracing: ResNet50, 2 epochs of 2 steps, 26.4 s to 11.4 s without
    keras-actgrad (see `benchmarks/bench_coldstart.py`). The variables are
    the ones the first trace would create, with the same initial values,
    so training is unchanged.

    Only for Keras's own `train_step` on a model whose layers are all
    built. A custom `train_step` may use other optimizers. A layer built
    on its first call may still add trainable variables, which the
    optimizer would then not know.
    """
    optimizer = getattr(model, "optimizer", None)
    if (
        optimizer is None
        or optimizer.built
        or type(model).train_step is not keras.Model.train_step
        or not all(layer.built for layer in model._flatten_layers())
    ):
        return
    optimizer.build(model.trainable_variables)
