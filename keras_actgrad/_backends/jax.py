"""The JAX adapter: the only module of the engine that imports JAX.

JAX differentiates functions, not tensors, so each probe adds a zero
perturbation to its output during the probe pass, and the gradient of the
loss with respect to that perturbation is d loss / d (probe output): it flows
back only through the probe's consumers, so uses of the probe's input that
bypass it are not counted, as on TensorFlow. The pass is a pure function of
(trainable values, non-trainable values, perturbations, data), run inside a
`keras.StatelessScope` that maps every model variable to its value, and
compiled with `jax.jit`, which retraces only for a new input signature.
The compiled pass is called inside an outer `keras.StatelessScope`, so that
variables the pass creates (a multi-output model's loss trackers) are
initialized outside the trace (see `function` below).

At trace time, a first abstract pass (`jax.eval_shape`) records the probes'
shapes so the perturbations can be built. JAX returns zeros, not `None`, for
an input the output does not depend on; to report `None` where a probe (or a
weight) is not connected to the loss, as TensorFlow does, the backward pass
is traced once into a jaxpr with the output cotangent as an input, and a
gradient that does not depend on that cotangent is structurally zero.

Statistics: the probes of one shape and dtype are reduced together, one
`lax.map` over their stack, so XLA compiles each reduction once per shape
rather than once per probe; and they are built for finite tensors, without
the moments' branches for NaN and Inf, next to one test of finiteness. When
that test fails, the pass is taken again with the exact statistics (a second
program, compiled the first time a probe sees a NaN or an Inf).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import keras
import numpy as np

from keras_actgrad._backends.base import (
    LossFn,
    PassConfig,
    ProbeReducer,
    Tapped,
    TapRecorder,
    forward,
    loss_scale,
    loss_scaled,
    reduce,
    to_float32,
)
from keras_actgrad._backends.processes_jax import replicated
from keras_actgrad._statistics.moments import Moments, assume_finite


def _is_float(tensor: Any) -> bool:
    dtype = getattr(tensor, "dtype", None)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def _scaled(pullback: Callable[[Any], Any], scale: Any) -> Any:
    """`pullback` of a float16 pass, loss-scaled, unscaled in float32.

    The cotangent is `scale`, backed off while the gradients overflow (see
    `base.loss_scaled`).
    """
    structure: list[Any] = []

    def compute(current: Any) -> list[Any]:
        leaves, tree = jax.tree_util.tree_flatten(pullback(current))
        structure[:] = [tree]
        return [leaf.astype(jnp.float32) for leaf in leaves]

    unscaled = loss_scaled(compute, scale)
    return jax.tree_util.tree_unflatten(structure[0], unscaled)


def _subjaxpr(eqn: Any) -> Any:
    """The one inner jaxpr an equation applies to its operands, if any."""
    found = []
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if isinstance(inner, jax_core.Jaxpr):
            found.append(inner)
    if len(found) == 1:
        inner = found[0]
        if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(
            eqn.outvars
        ):
            return inner
    return None


def _depends(jaxpr: Any, marked: list[bool]) -> list[bool]:
    """Which outputs of `jaxpr` depend on the inputs flagged in `marked`.

    Forward propagation over the equations, exact through inner jaxprs that
    map operands one to one (jit, custom_jvp), conservative otherwise (every
    output of an equation depends on it if any operand does).
    """
    tainted = {var for var, flag in zip(jaxpr.invars, marked, strict=True) if flag}
    for eqn in jaxpr.eqns:
        flags = [isinstance(var, jax_core.Var) and var in tainted for var in eqn.invars]
        if not any(flags):
            continue
        inner = _subjaxpr(eqn)
        out_flags = (
            _depends(inner, flags) if inner is not None else [True] * len(eqn.outvars)
        )
        tainted.update(
            var for var, flag in zip(eqn.outvars, out_flags, strict=True) if flag
        )
    return [isinstance(var, jax_core.Var) and var in tainted for var in jaxpr.outvars]


def _distribute(data: Any) -> Any:
    """Shards the batch along its first axis under a `keras.distribution`."""
    distribution = keras.distribution.distribution()
    if distribution is None or data is None:
        return data

    def shard(leaf: Any) -> Any:
        shape = getattr(leaf, "shape", None)
        if not shape:
            return leaf
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf  # placed over several processes (`processes_jax.place`)
        layout = distribution.get_data_layout(tuple(shape))
        try:
            return keras.distribution.distribute_tensor(leaf, layout)
        except ValueError:  # batch not divisible by the devices: replicate
            return leaf

    return keras.tree.map_structure(shard, data)


def _shares_by_shape(
    share: Callable[[Any], list[Any]], tensors: dict[str, Any]
) -> tuple[dict[str, list[Any]], list[Any]]:
    """`share` of each tensor, and one sum a group to test finiteness.

    The tensors of one shape and dtype are reduced together: stacked, and
    `share` mapped over the stack (`lax.map`, a loop whose body XLA
    compiles once), instead of one copy of the reductions per probe in the
    compiled program. ResNet50's 107 probes make 20 groups (activations
    and gradients); the first probe pass then compiles in about half the
    time, warm events cost the same (`benchmarks/bench_coldstart.py`).
    The stack holds a group's tensors together until its reductions run.
    """
    groups: dict[Any, list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault((tuple(tensor.shape), str(tensor.dtype)), []).append(name)
    shares: dict[str, list[Any]] = {}
    sums = []
    for names in groups.values():
        if len(names) == 1:
            tensor = tensors[names[0]]
            shares[names[0]] = share(tensor)
            sums.append(jnp.sum(tensor, dtype=jnp.float32))
            continue
        stacked = jnp.stack([tensors[name] for name in names])
        mapped = jax.lax.map(share, stacked)
        for index, name in enumerate(names):
            shares[name] = [part[index] for part in mapped]
        sums.append(jnp.sum(stacked, dtype=jnp.float32))
    return shares, sums


def _reduce_by_shape(
    reducer: Any,
    activations: dict[str, Any],
    gradients: dict[str, Any],
    weight_gradients: dict[str, Any],
) -> tuple[Any, Any]:
    """A `ProbeReducer`'s output (see `_shares_by_shape`) and whether it is finite.

    The second value is False when a probe's activation or gradient holds
    a NaN or an Inf (or so large a sum that it overflows): a pass built
    under `assume_finite` must then be taken again without it.
    """
    a_shares, a_sums = _shares_by_shape(reducer.reduce_activation, activations)
    present = {name: g for name, g in gradients.items() if g is not None}
    g_shares, g_sums = _shares_by_shape(reducer.reduce_gradient, present)
    for name in activations:
        if name not in g_shares:
            g_shares[name] = reducer.reduce_gradient(None)
    sums = a_sums + g_sums
    finite = jnp.isfinite(jnp.sum(jnp.stack(sums))) if sums else jnp.asarray(True)
    return reducer.combine(a_shares, g_shares, weight_gradients), finite


class JaxAdapter:
    """Builds the pass as one `jax.jit` function."""

    moments: type[Moments] = Moments

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[..., Any]:
        def run(
            trainable: list[Any],
            non_trainable: list[Any],
            perturbations: list[Any] | None,
            x: Any,
            y: Any,
            sample_weight: Any,
            record: list[tuple[str, Any, bool]],
        ) -> tuple[Any, dict[str, Any]]:
            """The loss of the probe pass; fills `record` with what it tapped."""
            remaining = iter(perturbations or [])

            def perturbed(tensor: Any) -> Any:
                if perturbations is None:
                    return tensor
                return tensor + next(remaining)

            recorder = TapRecorder(_is_float, perturbed)
            mapping = list(
                zip(model.trainable_variables, trainable, strict=True)
            ) + list(zip(model.non_trainable_variables, non_trainable, strict=True))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                y_pred = forward(
                    model, x, config.training, recorder.tap, config.sites, config.loss
                )
                loss = jnp.asarray(
                    loss_fn(x, y, y_pred, sample_weight), dtype=jnp.float32
                )
            for t in recorder.tapped:
                spec = jax.ShapeDtypeStruct(t.activation.shape, t.activation.dtype)  # type: ignore[no-untyped-call]
                record.append((t.name, spec, t.differentiable))
            return loss, {t.name: t.activation for t in recorder.tapped}

        def step(
            trainable: list[Any],
            non_trainable: list[Any],
            x: Any,
            y: Any,
            sample_weight: Any,
            scale: Any,
            inputs: Any,
            exact: bool = False,
        ) -> Any:
            # 1. An abstract pass gives the probes' shapes (trace time only).
            record: list[tuple[str, Any, bool]] = []
            jax.eval_shape(
                lambda t, n, x, y, w: run(t, n, None, x, y, w, record),
                trainable,
                non_trainable,
                x,
                y,
                sample_weight,
            )
            specs = [spec for _, spec, ok in record if ok]
            float16 = any(spec.dtype == jnp.float16 for spec in specs)
            perturbations = [jnp.zeros(spec.shape, spec.dtype) for spec in specs]

            # 2. Forward and backward, traced once into a jaxpr whose inputs
            # include the output cotangent, so connectivity can be read off.
            def full(
                trainable: list[Any],
                perturbations: list[Any],
                non_trainable: list[Any],
                x: Any,
                y: Any,
                sample_weight: Any,
                cotangent: Any,
                scale: Any,
            ) -> Any:
                def loss_of(trainable: list[Any], perturbations: list[Any]) -> Any:
                    return run(
                        trainable, non_trainable, perturbations, x, y, sample_weight, []
                    )

                if config.weight_gradients:
                    loss, pullback, activations = jax.vjp(
                        loss_of, trainable, perturbations, has_aux=True
                    )
                else:
                    loss, pullback, activations = jax.vjp(
                        lambda p: loss_of(trainable, p), perturbations, has_aux=True
                    )
                # The plain pullback shows connectivity (and is the result
                # unless a probe is float16: XLA drops it then).
                plain = pullback(cotangent)
                grads = _scaled(pullback, scale) if float16 else plain
                if not config.weight_gradients:
                    plain, grads = ((), *plain), ((), *grads)
                grads = jax.tree_util.tree_map(to_float32, grads)
                return loss, activations, plain, grads

            args = (
                trainable,
                perturbations,
                non_trainable,
                x,
                y,
                sample_weight,
                jnp.ones((), jnp.float32),
                scale,
            )
            closed, out_shape = jax.make_jaxpr(full, return_shape=True)(*args)
            flat_args = jax.tree_util.tree_leaves(args)
            marked = [False] * (len(flat_args) - 2) + [True, False]
            connected_flat = _depends(closed.jaxpr, marked)
            flat_out = jax_core.jaxpr_as_fun(closed)(*flat_args)
            out_tree = jax.tree_util.tree_structure(out_shape)
            loss, activations, _, grads = jax.tree_util.tree_unflatten(
                out_tree, flat_out
            )
            weight_grads, probe_grads = grads
            connected = jax.tree_util.tree_unflatten(out_tree, connected_flat)
            weight_connected, probe_connected = connected[2]

            tapped: list[Tapped] = []
            gradients: dict[str, Any] = {}
            index = 0
            for name, _, differentiable in record:
                gradient = None
                if differentiable:
                    if probe_connected[index]:
                        gradient = probe_grads[index]
                    index += 1
                gradients[name] = gradient
                tapped.append(Tapped(name, activations[name], differentiable))
            on_trace(tapped)
            variables = model.trainable_variables if config.weight_gradients else []
            weight_gradients = {
                variable.path: (gradient if ok else None)
                for variable, gradient, ok in zip(
                    variables, weight_grads, weight_connected, strict=True
                )
            }
            # Several processes: every host reads the outputs of its own devices.
            if isinstance(config.reducer, ProbeReducer) and inputs is None:
                # The statistics for finite tensors (no branches), with a
                # test of finiteness; `function` takes the exact pass when
                # it fails.
                with assume_finite(not exact):
                    output, finite = _reduce_by_shape(
                        config.reducer, activations, gradients, weight_gradients
                    )
                return replicated((output, finite))
            output = reduce(
                config.reducer, activations, gradients, weight_gradients, loss, inputs
            )
            return replicated((output, None))

        jitted = jax.jit(step, static_argnames=("exact",))

        def function(x: Any, y: Any, sample_weight: Any, inputs: Any = None) -> Any:
            # Mid-`fit`, Keras's JAX trainer keeps the weights outside the
            # variables; attach them (as `Callback.model` does).
            sync = getattr(model, "jax_state_sync", None)
            if sync is not None:
                sync()
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            args = (
                trainable,
                non_trainable,
                _distribute(x),
                _distribute(y),
                _distribute(sample_weight),
                jnp.asarray(loss_scale(model), jnp.float32),
                inputs,
            )
            # Variables the pass creates (the loss trackers a multi-output
            # model's `CompileLoss` builds on its first `compute_loss`) are
            # initialized when the outermost `StatelessScope` exits. Inside
            # the trace they would get tracers for values, which leak into
            # the model and into later traces as constants (and JAX's
            # dispatch fast path then calls the compiled pass with the wrong
            # arguments). This scope, outside the trace, makes the pass's own
            # scopes inner ones: the new variables are initialized here, on
            # concrete values (TensorFlow does this with `tf.init_scope`).
            with keras.StatelessScope():
                output, finite = jitted(*args, exact=False)
                if finite is not None and not bool(finite):
                    # A NaN or Inf in a probe's tensors: the pass again,
                    # with the exact statistics (compiled on first use).
                    output, _ = jitted(*args, exact=True)
            return output

        return function

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)
