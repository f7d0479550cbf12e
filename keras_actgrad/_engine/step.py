"""The monitored training step: statistics from `fit`'s own backward pass.

`MonitoredStep` builds, next to Keras's own train function, a *monitored*
one: the model's `train_step`, traced (compiled as Keras compiles it) with
a tap installed at every `GradientProbe` and the optimizer's `apply` (or
`stateless_apply`) observed. The tap is an identity in the forward pass
whose backward pass reduces the incoming gradient (d loss / d probe output)
and the probe's output to the statistics' moments, on the device; the
observer takes the norms of the gradients the optimizer receives (unscaled,
before clipping) and of the update it makes. The gradient passed on is the
incoming one untouched, and the optimizer's update is its own: the step
trains bit for bit as Keras's.

The callback switches `model.train_function` between the two before each
step: a step not monitored runs Keras's function, untouched, so it costs
nothing. The moments leave the step in its `logs` under one key, which the
wrapper returned by `function` pops before Keras sees the logs.

Spikes: with a `threshold` (the callback's running median of the global
gradient norm times `spike_factor`), a monitored step also computes every
statistic and histogram of every probe, under a device-side condition
`global gradient norm > threshold` (a finite norm, over the gradients that
exist: `_Trace.global_sq_norm`, the host's `global_grad_norm`), from the
tensors its backward pass recorded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import keras

from keras_actgrad._backends import (
    processes,
    replicas,
    step_hooks,
    step_moments_class,
)
from keras_actgrad._backends.base import StepHooks
from keras_actgrad._engine.passes import (
    NO_TAP_CROSSED,
    Pass,
    base_path,
    held_optimizers,
    no_scale,
    observer,
    order_of,
    wrap_backward,
)
from keras_actgrad._layers import Site, taps_in
from keras_actgrad._statistics.moments import Moments, in_xla
from keras_actgrad._statistics.nonfinite import step_checks
from keras_actgrad._statistics.statistics import STATISTICS, moments_for

PAYLOAD_KEY = "__keras_actgrad_monitor__"
Tensor = Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What fixes a monitored train function."""

    statistics: tuple[str, ...]
    bins: int  # 0: no histograms
    weight_gradients: bool
    spike_bins: int  # 0: no spike detection; else the full record's bins

    @property
    def moments(self) -> tuple[str, ...]:
        return moments_for(self.statistics)

    @property
    def full_moments(self) -> tuple[str, ...]:
        return moments_for(STATISTICS)

    def row_size(self) -> int:
        return len(self.moments) + (2 * (2 + self.bins) if self.bins else 0)

    def full_row_size(self) -> int:
        return len(self.full_moments) + 2 * (2 + self.spike_bins)


def _backend() -> type[StepHooks]:
    return step_hooks()


def _is_float(tensor: Any) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return False
    try:
        name = keras.backend.standardize_dtype(dtype)
    except ValueError:
        return False
    return bool(name.startswith(("float", "bfloat")))


def _row(probe: Moments, moments: tuple[str, ...], bins: int) -> Tensor:
    parts = [probe.row(moments)]
    if bins:
        parts.append(probe.histogram("g", bins))
        parts.append(probe.histogram("a", bins))
    return keras.ops.concatenate(parts) if len(parts) > 1 else parts[0]


def _unreached_row(probe: Moments, moments: tuple[str, ...], bins: int) -> Tensor:
    """`_row` of a tap that no gradient reached (`probe` without a gradient).

    Its activation share as the probe pass's `StatisticsReducer.
    reduce_activation` computes it (the activation moments alone), its
    gradient share as `reduce_gradient(None)`: NaN moments, an empty
    histogram.
    """
    ops = keras.ops
    a_moments = tuple(m for m in moments if m.startswith("a_"))
    a_row: Tensor = probe.row(a_moments) if a_moments else None
    parts = []
    if moments:
        nan = ops.full((), float("nan"), "float32")
        parts.append(
            ops.stack(
                [a_row[a_moments.index(m)] if m in a_moments else nan for m in moments]
            )
        )
    if bins:
        empty = [float("inf"), float("-inf")] + [0.0] * bins
        parts.append(ops.convert_to_tensor(empty, "float32"))
        parts.append(probe.histogram("a", bins))
    return ops.concatenate(parts) if len(parts) > 1 else parts[0]


class _Trace:
    """What one trace of the monitored step records (backend tensors)."""

    def __init__(
        self,
        config: StepConfig,
        scale: Callable[[], Tensor | None],
        custom: bool = False,
    ):
        self.config = config
        self.scale = scale
        # A `train_step` of the model's own: its backward passes are told
        # apart (`_Pass`), and every optimizer it applies is observed.
        self.custom = custom
        self.order: list[str] = []
        # Keyed by (pass index, tap visit name); Keras's own step: pass 0.
        self.rows: dict[tuple[int, str], Tensor] = {}
        self.stash: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self.weights: Tensor | None = None
        self.passes: list[Pass] = []
        self._scopes: list[Pass] = []
        self._forward_since_gradient = True
        # Per optimizer application: its weight squares (3, n).
        self._applied: list[Tensor] = []
        self.weight_paths: list[str] = []
        # Per trainable variable, whether it has a gradient (trace time).
        self.has_gradient: list[bool] = []
        # JAX: the indices of the trainable variables a gradient reached,
        # marked by their taps' backward functions (`None`: not tapped).
        self.reached: set[int] | None = None
        self.full: Tensor | None = None
        self.spike: Tensor | None = None
        # The non-finite checks (`step_checks`), the loss's and the loss
        # scale of the gradients the optimizer received.
        self.checks: Tensor | None = None
        self._checks: list[Tensor] = []  # per optimizer application
        self.checked: list[str] = []
        self.loss_check: Tensor | None = None
        self.step_scale: Any = None
        self._calls: dict[str, int] = {}
        self._probe_class = step_moments_class()
        # Built inside the step's trace: `in_xla` says whether it is XLA's.
        self._reductions = _backend().reductions(in_xla())
        self._replicas = replicas()
        # The activations of the taps no gradient has reached (yet): handles
        # kept only when an activation moment, histogram or spike record is
        # asked for, dropped as the gradient arrives. What is left after the
        # backward pass is reduced in `payload` (as the probe pass reports
        # such a tap: activation statistics, NaN gradient statistics).
        self.forward: dict[str, Tensor] = {}
        self._row_reads_activation = bool(
            any(m.startswith("a_") for m in config.moments) or config.bins
        )
        self._reads_activation = bool(
            any(m.startswith("a_") for m in config.moments)
            or config.bins
            or config.spike_bins
        )

    def tap(self, probe: Any, tensor: Tensor) -> Tensor:
        count = self._calls.get(probe.name, 0)
        self._calls[probe.name] = count + 1
        name = probe.name if count == 0 else f"{probe.name}@{count}"
        self.order.append(name)
        self._forward_since_gradient = True
        if not _is_float(tensor):
            return tensor

        def on_forward(activation: Tensor) -> None:
            if self._reads_activation:
                self.forward[name] = activation

        def on_gradient(activation: Tensor, gradient: Tensor) -> None:
            self.forward.pop(name, None)
            key = (self._current_pass(), name)
            # Under tf.distribute: the global batch's, from every replica.
            activation, gradient = self._replicas.gather(activation, gradient)
            gradient = keras.ops.cast(gradient, "float32")
            scale = self.scale()
            if scale is not None:
                gradient = gradient / scale
            if self._row_reads_activation:
                row = self._reductions("row", self._row, activation, gradient)
            else:
                # The gradient alone: a function that took the activation
                # would read it (see `_row_of_gradient`).
                row = self._reductions("row", self._row_of_gradient, gradient)
            self.rows[key] = row
            if self.config.spike_bins:
                self.stash[key] = (activation, gradient)

        return _backend().identity(tensor, on_gradient, on_forward)

    def _row(self, activation: Tensor, gradient: Tensor) -> Tensor:
        """One tap's row of the step's statistics (see `_row`)."""
        probe = self._probe_class(activation, gradient)
        return _row(probe, self.config.moments, self.config.bins)

    def _row_of_gradient(self, gradient: Tensor) -> Tensor:
        """`_row` of a row that reads no activation: of the gradient alone.

        A TensorFlow function kept out of line that takes the activation
        reads it (the moments cast it; Grappler cannot prune inside the
        call): a BatchNormalization output read so is no longer merged by
        Grappler into the residual Add after it, and training rounds
        differently (`test_monitor_conv.py`). The gradient stands in for
        the activation (same shape; no activation moment is read).
        """
        probe = self._probe_class(gradient, gradient)
        return _row(probe, self.config.moments, self.config.bins)

    def _full_row(self, activation: Tensor, gradient: Tensor) -> Tensor:
        """One tap's row of a spike's full record."""
        probe = self._probe_class(activation, gradient)
        return _row(probe, self.config.full_moments, self.config.spike_bins)

    # -- backward passes (a custom `train_step`)

    @contextlib.contextmanager
    def backward_pass(self) -> Iterator[Pass]:
        """The scope of one backward pass (a call of `tape.gradient`, ...)."""
        current = Pass(len(self.passes))
        self.passes.append(current)
        self._scopes.append(current)
        try:
            yield current
        finally:
            self._scopes.pop()

    def _current_pass(self) -> int:
        """The pass of a gradient arriving at a tap now.

        Keras's own step takes one pass (0). In a custom step, the pass
        whose scope is open (`backward_pass`); outside any (a backward
        function the monitor does not wrap), a new pass after every forward
        visit of a tap.
        """
        if not self.custom:
            return 0
        if self._scopes:
            return self._scopes[-1].index
        if self._forward_since_gradient or not self.passes:
            self.passes.append(Pass(len(self.passes)))
        self._forward_since_gradient = False
        return self.passes[-1].index

    def applied(self, label: str, grads: list[Any]) -> None:
        """Notes which pass's gradients the optimizer `label` applies.

        The pass that returned (one of) these gradient tensors; else the
        last pass no optimizer has applied yet (PyTorch's `backward`
        returns nothing: the gradients are in `.grad`).
        """
        ids = {id(g) for g in grads if g is not None}
        for candidate in reversed(self.passes):
            if candidate.outputs & ids:
                candidate.optimizers.append(label)
                return
        for candidate in reversed(self.passes):
            if not candidate.optimizers and not candidate.open(self._scopes):
                candidate.optimizers.append(label)
                return

    def pass_labels(self) -> dict[int, str]:
        """The passes with measured taps, each named (in pass order).

        A pass is named after the optimizer that applied its gradients (the
        model attribute holding it, e.g. `d_optimizer`), `@1`, `@2`, ... for
        that optimizer's later passes in the step; a pass no optimizer
        applied is `pass<i>` (its index among the step's backward passes).
        """
        indices = sorted({index for index, _ in self.rows})
        labels: dict[int, str] = {}
        seen: collections.Counter[str] = collections.Counter()
        for index in indices:
            optimizers = self.passes[index].optimizers if self.passes else []
            if optimizers:
                base = optimizers[0]
                count = seen[base]
                seen[base] += 1
                labels[index] = base if count == 0 else f"{base}@{count}"
            else:
                labels[index] = f"pass{index}"
        return labels

    def _single_pass(self) -> int:
        """The index of the one pass with measured taps (0 if none)."""
        labels = self.pass_labels()
        return next(iter(labels)) if labels else 0

    def keys(self, table: dict[tuple[int, str], Any]) -> dict[tuple[int, str], str]:
        """The result key of every (pass, tap visit), in reading order.

        One pass: the visit's name, as Keras's own step names it. Several:
        `<pass label>/<probe>`, the visits of a probe numbered within each
        pass (`<pass label>/<probe>@1` for its second visit in that pass).
        """
        position = {name: i for i, name in enumerate(self.order)}
        ordered = sorted(table, key=lambda k: (k[0], position.get(k[1], 0), k[1]))
        labels = self.pass_labels()
        if len(labels) <= 1:
            return {key: key[1] for key in ordered}
        out: dict[tuple[int, str], str] = {}
        visits: collections.Counter[tuple[int, str]] = collections.Counter()
        for index, name in ordered:
            base = re.sub(r"@\d+$", "", name)
            count = visits[(index, base)]
            visits[(index, base)] += 1
            visit = base if count == 0 else f"{base}@{count}"
            out[(index, name)] = f"{labels[index]}/{visit}"
        return out

    def _unreached(self) -> dict[str, Tensor]:
        """The activations of the taps no gradient reached (global batch)."""
        backend = _backend()
        out: dict[str, Tensor] = {}
        if len(self.pass_labels()) > 1:
            # Several passes: a visit no pass reached belongs to none.
            return out
        reached = {name for _, name in self.rows}
        for name in sorted(self.forward):
            activation = self.forward[name]
            if name in reached or not backend.readable(activation):
                continue
            out[name] = self._replicas.gather(activation, activation)[0]
        return out

    def observe(
        self,
        paths: list[str],
        grads: list[Any],
        old: list[Tensor] | None,
        new: list[Tensor],
        scale: Any,
        accumulate: bool = False,
    ) -> None:
        """Weight-gradient norms (unscaled), update norms, weight norms.

        With `old` None (no weight statistics asked for), only the
        non-finite checks of the gradients and the updated weights.
        A variable without a gradient (None: TensorFlow, PyTorch; on JAX,
        whose `grad` gives zeros, a variable whose tap no gradient reached)
        is known here, at trace time: its squared gradient norm is NaN and
        it is left out of the global norm (`global_sq_norm`).
        """
        if self.reached is not None:
            reached = self.reached
            grads = [g if i in reached else None for i, g in enumerate(grads)]
        # Under tf.distribute: summed over the replicas, as the optimizer does.
        grads = self._replicas.sum(grads)
        # Several applications (a custom step's optimizers, `accumulate`):
        # one after the other; a variable updated twice gets `@1` on its
        # second path. Keras's own step applies once (a replica's call under
        # tf.distribute observes the same, summed, gradients): it replaces.
        if not accumulate:
            self.checked, self.weight_paths, self.has_gradient = [], [], []
            self._applied, self._checks = [], []
        named = []
        for path in paths:
            count = sum(1 for p in self.checked if base_path(p) == path)
            named.append(path if count == 0 else f"{path}@{count}")
        self.checked += named
        squares = None
        if old is not None:
            self.weight_paths += named
            self.has_gradient += [g is not None for g in grads]
            squares = self._probe_class.weight_squares(grads, old, new, scale)
            self._applied.append(squares)
            self.weights = (
                self._applied[0]
                if len(self._applied) == 1
                else keras.ops.concatenate(self._applied, axis=1)
            )
        self._checks.append(step_checks(grads, new, squares))
        self.checks = (
            self._checks[0]
            if len(self._checks) == 1
            else keras.ops.concatenate(self._checks, axis=1)
        )
        self.step_scale = scale

    def global_sq_norm(self) -> Tensor:
        """The squared global gradient norm: over the gradients that exist.

        The variables without a gradient (known at trace time) are left
        out, as the optimizer skips them; a non-finite gradient that exists
        makes it non-finite. The host's `global_grad_norm` is the same sum
        (`unpack`).
        """
        ops = keras.ops
        if self.weights is None:
            raise RuntimeError("Internal error: no weight gradients observed.")
        grad_sq = self.weights[0]
        present = [i for i, has in enumerate(self.has_gradient) if has]
        if len(present) == len(self.has_gradient):
            return ops.sum(grad_sq)
        if not present:
            return ops.zeros((), "float32")
        return ops.sum(ops.take(grad_sq, ops.convert_to_tensor(present, "int32")))

    def record_spike(self, threshold: Tensor) -> None:
        """The full record, computed on the device only on a spike."""
        ops = keras.ops
        if self.weights is None:
            return
        global_norm = ops.sqrt(self.global_sq_norm())
        # As on the host (`GradientMonitor._finish_event`): a step whose
        # global norm is not finite is no spike (the non-finite alert's).
        spike = ops.logical_and(
            ops.isfinite(global_norm),
            ops.greater(global_norm, ops.cast(threshold, "float32")),
        )
        single = self._single_pass()
        for name, activation in self._unreached().items():
            self.stash[(single, name)] = (activation, None)
        keys = self.keys(self.stash)
        names = list(keys)
        size = self.config.full_row_size()

        def full() -> Tensor:
            rows = []
            for name in names:
                a, g = self.stash[name]
                if g is None:
                    rows.append(
                        _unreached_row(
                            self._probe_class(a, g),
                            self.config.full_moments,
                            self.config.spike_bins,
                        )
                    )
                else:
                    rows.append(self._reductions("full", self._full_row, a, g))
            return ops.stack(rows) if rows else ops.zeros((0, size), "float32")

        def nothing() -> Tensor:
            return ops.zeros((len(names), size), "float32")

        self.full = ops.cond(spike, full, nothing)
        self.full_names = list(keys.values())
        self.spike = ops.cast(spike, "float32")

    def payload(self) -> Tensor:
        """Everything the step measured, as one float32 vector (see `Layout`)."""
        ops = keras.ops
        # Only when the row reads the activation (else its NaN row is the
        # monitor's default for a missing row).
        if self.config.bins or any(m.startswith("a_") for m in self.config.moments):
            single = self._single_pass()
            for name, activation in self._unreached().items():
                self.rows[(single, name)] = _unreached_row(
                    self._probe_class(activation, None),
                    self.config.moments,
                    self.config.bins,
                )
        if self.custom and not self.rows:
            raise ValueError(NO_TAP_CROSSED)
        keys = self.keys(self.rows)
        names = list(keys.values())
        parts = [self.rows[key] for key in keys]
        weights = 0
        if self.weights is not None:
            weights = int(self.weights.shape[1])
            parts.append(ops.reshape(self.weights, (-1,)))
        full_names: list[str] = []
        if self.full is not None:
            full_names = list(self.full_names)
            parts.append(ops.reshape(self.full, (-1,)))
            parts.append(ops.reshape(self.spike, (1,)))
        labels = self.pass_labels()
        groups = [order_of(labels[index], keys) for index in labels]
        if len(labels) > 1:
            order = names
        else:
            # One pass: every visit, as Keras's own step reports them.
            order = list(dict.fromkeys(self.order))
        parts += self._check_parts()
        self.layout = Layout(
            order=order,
            probes=names,
            weights=weights,
            weight_paths=list(self.weight_paths),
            weight_has_gradient=list(self.has_gradient),
            spike=self.full is not None,
            full_probes=full_names,
            passes=groups if len(groups) > 1 else [],
            checked=list(self.checked),
        )
        return ops.concatenate([ops.cast(p, "float32") for p in parts])

    def _check_parts(self) -> list[Tensor]:
        """The tail of the vector: checks, loss check, loss scale (`Layout`)."""
        ops = keras.ops
        nan = ops.full((1,), float("nan"), "float32")
        parts = []
        if self.checks is not None:
            parts.append(ops.reshape(self.checks, (-1,)))
        parts.append(
            nan if self.loss_check is None else ops.reshape(self.loss_check, (1,))
        )
        scale = self.step_scale
        parts.append(
            nan if scale is None else ops.reshape(ops.cast(scale, "float32"), (1,))
        )
        return parts


@dataclasses.dataclass
class Layout:
    """How a monitored step's vector is laid out (recorded at trace time).

    `probes` rows (sorted names, `StepConfig.row_size()` each), then with
    `weights` > 0 three rows of that many values (squared norms of the
    unscaled gradients, of the updates and of the weights before the
    update, in `model.trainable_variables` order; NaN gradient norm for a
    variable without a gradient, `weight_has_gradient` False), then with
    `spike` the full rows of `full_probes` (`StepConfig.full_row_size()`
    each) and a value, 1.0 on a spike step; last, the non-finite checks:
    two rows of `len(checked)` values (1.0 where the gradient, then the
    weights after the update, of each variable of `checked` hold a NaN or
    Inf: `step_checks`), 1.0 when the step's `logs["loss"]` is not finite
    (NaN: no loss in the logs), and the loss scale of the gradients the
    optimizer received (NaN: none).
    """

    # The result keys in reading order: every tap visit (one pass), or
    # `<pass>/<probe>` of those measured (several passes).
    order: list[str]
    probes: list[str]
    weights: int
    weight_paths: list[str]
    weight_has_gradient: list[bool]
    spike: bool
    full_probes: list[str]
    # Several passes (a custom step): each pass's keys, in reading order.
    passes: list[list[str]] = dataclasses.field(default_factory=list)
    checked: list[str] = dataclasses.field(default_factory=list)


class _DataWithThreshold:
    """An iterator adding the spike threshold to every batch (JAX)."""

    def __init__(self, iterator: Any, threshold: Any) -> None:
        self._iterator = iterator
        self._threshold = threshold

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return (next(self._iterator), self._threshold)


class MonitoredStep:
    """Builds and runs a model's monitored train function.

    Args:
        model: the compiled model (its class must not override `train_step`).
        config: the `StepConfig`.
    """

    def __init__(
        self, model: keras.Model, config: StepConfig, sites: tuple[Site, ...] = ()
    ) -> None:
        self.model = model
        self.config = config
        # Layers measured in place (`layers=`); empty: the model's probes.
        self.sites = sites
        self.layout: Layout | None = None
        self.weight_paths = [v.path for v in model.trainable_variables]
        # The model's class writes its own `train_step` (a GAN, a VAE, ...).
        self.custom = type(model).train_step is not keras.Model.train_step
        self.threshold = float("inf")
        self._threshold_variable: Any = None
        if config.spike_bins and not _backend().stateless:
            # Read by the compiled step, set from the host between steps.
            self._threshold_variable = keras.Variable(
                self.threshold,
                dtype="float32",
                trainable=False,
                name="actgrad_spike_threshold",
            )
        self.payload: Any = None
        # JAX: the spike threshold of the step being traced (a traced input).
        self._jax_threshold: Any = None
        self._function = self._build()

    # -- building

    def _scale(self, optimizer: Any) -> Callable[[], Tensor | None]:
        """The loss scale of the step (read in the backward pass)."""
        factor = optimizer.loss_scale_factor
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return lambda: factor
        inner_factor = optimizer.inner_optimizer.loss_scale_factor

        def scale() -> Tensor:
            dynamic = (
                optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            )
            value = keras.ops.cast(dynamic, "float32")
            for f in (factor, inner_factor):
                if f is not None:
                    value = value * f
            return value

        return scale

    @contextlib.contextmanager
    def _instrumented(self, trace: _Trace) -> Iterator[None]:
        """Installs the tap and observes the optimizer, for one trace."""
        if self.custom:
            with self._instrumented_custom(trace):
                yield
            return
        model = self.model
        optimizer = model.optimizer
        config = self.config
        # The optimizer is observed on every monitored step (the non-finite
        # checks); the weight norms, and the copies of the weights they
        # need, only when asked for.
        norms = bool(config.weight_gradients or config.spike_bins)
        patched: dict[str, Any] = {}
        backend = _backend()
        monitor = self
        if not backend.stateless:
            original = optimizer.apply

            def apply(grads: Any, trainable_variables: Any = None) -> Any:
                variables = (
                    list(model.trainable_variables)
                    if trainable_variables is None
                    else list(trainable_variables)
                )
                scale = trace.scale()
                if scale is not None and not isinstance(scale, (int, float)):
                    # The scale before the update changes it (PyTorch
                    # changes a variable's tensor in place).
                    scale = backend.copy(scale)
                old = [backend.copy(v.value) for v in variables] if norms else None
                result = original(grads, trainable_variables)
                trace.observe(
                    [v.path for v in variables],
                    list(grads),
                    old,
                    [v.value for v in variables],
                    scale,
                )
                if config.spike_bins:
                    trace.record_spike(self._threshold_value())
                return result

            patched["apply"] = apply
        if backend.stateless:
            original_stateless = optimizer.stateless_apply

            def stateless_apply(
                optimizer_variables: Any, grads: Any, trainable_variables: Any
            ) -> Any:
                new_trainable, new_optimizer = original_stateless(
                    optimizer_variables, grads, trainable_variables
                )
                trace.observe(
                    monitor.weight_paths,
                    list(grads),
                    list(trainable_variables) if norms else None,
                    list(new_trainable),
                    trace.scale(),
                )
                if config.spike_bins:
                    trace.record_spike(self._jax_threshold)
                return new_trainable, new_optimizer

            patched["stateless_apply"] = stateless_apply
        for name, function in patched.items():
            object.__setattr__(optimizer, name, function)
        tapped_model = False
        if norms and backend.stateless:
            # `jax.grad` gives zeros for a variable no gradient reaches: an
            # identity on each trainable variable, inside the function Keras
            # differentiates, marks the ones reached (its backward function
            # is not called for the others), so that they are told apart
            # from a zero gradient as TensorFlow's None tells them.
            reached: set[int] = set()
            trace.reached = reached
            original_loss = model.compute_loss_and_updates

            def compute_loss_and_updates(
                trainable_variables: Any, *args: Any, **kwargs: Any
            ) -> Any:
                reached.clear()

                def mark(index: int) -> Callable[[Tensor, Tensor], None]:
                    return lambda _a, _g: reached.add(index)

                tapped = [
                    backend.identity(v, mark(i), lambda _a: None)
                    for i, v in enumerate(trainable_variables)
                ]
                return original_loss(tapped, *args, **kwargs)

            object.__setattr__(
                model, "compute_loss_and_updates", compute_loss_and_updates
            )
            tapped_model = True
        try:
            with taps_in(model, self.sites, trace.tap):
                yield
        finally:
            for name in patched:
                optimizer.__dict__.pop(name, None)
            if tapped_model:
                model.__dict__.pop("compute_loss_and_updates", None)

    @contextlib.contextmanager
    def _instrumented_custom(self, trace: _Trace) -> Iterator[None]:
        """`_instrumented` for a `train_step` of the model's own.

        The step's backward passes are told apart by wrapping the functions
        that run one (`StepHooks.backward_functions`: `tape.gradient`,
        `jax.grad` / `value_and_grad` / `vjp`, `torch.autograd.backward` /
        `grad`) for the trace; every optimizer held by the model is observed
        (`apply`, or `stateless_apply` on JAX), and notes which pass's
        gradients it applies.
        """
        backend = _backend()
        observe = bool(self.config.weight_gradients or self.config.spike_bins)
        restore: list[tuple[Any, str, Any]] = []
        optimizers = held_optimizers(self.model)
        try:
            for owner, name, kind in backend.backward_functions():
                original = getattr(owner, name)
                restore.append((owner, name, original))
                setattr(owner, name, wrap_backward(trace, original, kind))
            for label, optimizer in optimizers:
                name = "stateless_apply" if backend.stateless else "apply"
                function = observer(trace, label, optimizer, observe, self._scale)
                object.__setattr__(optimizer, name, function)
            with taps_in(self.model, self.sites, trace.tap):
                yield
        finally:
            for _, optimizer in optimizers:
                optimizer.__dict__.pop("apply", None)
                optimizer.__dict__.pop("stateless_apply", None)
            for owner, name, original in reversed(restore):
                setattr(owner, name, original)

    def _threshold_value(self) -> Tensor:
        return self._threshold_variable.value

    def set_threshold(self, value: float) -> None:
        """Sets the spike threshold of the next monitored steps."""
        if value == self.threshold:
            return
        self.threshold = value
        if self._threshold_variable is not None:
            self._threshold_variable.assign(value)

    def _build(self) -> Callable[..., Any]:
        model = self.model
        step_class = type(model).train_step
        backend = _backend()
        monitor = self

        def finish(trace: _Trace, logs: Any) -> dict[str, Any]:
            if (
                monitor.custom
                and monitor.config.spike_bins
                and trace.weights is not None
            ):
                trace.record_spike(
                    monitor._jax_threshold
                    if backend.stateless
                    else monitor._threshold_value()
                )
            out: dict[str, Any] = dict(logs)
            out: dict[str, Any] = dict(logs)
            loss = out.get("loss")
            if loss is not None:
                ops = keras.ops
                finite = ops.isfinite(ops.cast(loss, "float32"))
                trace.loss_check = ops.cast(ops.logical_not(finite), "float32")
            # Several JAX processes: on every device, read by every host.
            out[PAYLOAD_KEY] = processes().replicated(trace.payload())
            monitor.layout = trace.layout
            return out

        if backend.stateless:
            optimizer = model.optimizer
            index = None
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                ids = [id(v) for v in optimizer.variables]
                index = ids.index(id(optimizer.dynamic_scale))
            default_scale = self._scale(optimizer)

            def train_step(state: Any, data: Any) -> Any:
                data, threshold = data
                monitor._jax_threshold = threshold
                if index is None:
                    scale = default_scale
                else:
                    value = state[2][index]
                    factor = optimizer.inner_optimizer.loss_scale_factor

                    def scale() -> Tensor:
                        s = keras.ops.cast(value, "float32")
                        return s if factor is None else s * factor

                if monitor.custom:
                    scale = no_scale
                trace = _Trace(monitor.config, scale, monitor.custom)
                with monitor._instrumented(trace):
                    logs, state = step_class(model, state, data)
                return finish(trace, logs), state

        else:

            def train_step(data: Any) -> Any:  # type: ignore[misc]
                trace = _Trace(
                    monitor.config,
                    no_scale if monitor.custom else monitor._scale(model.optimizer),
                    monitor.custom,
                )
                with monitor._instrumented(trace):
                    logs = step_class(model, data)
                return finish(trace, logs)

        return backend.make_train_function(model, train_step)

    # -- running

    def function(self, *args: Any) -> Any:
        """The monitored train function, called as Keras calls its own."""
        backend = _backend()
        if backend.stateless:
            state, iterator = args
            threshold = keras.ops.convert_to_tensor(self.threshold, "float32")
            logs, state = self._function(state, _DataWithThreshold(iterator, threshold))
            logs = dict(logs)
            self.payload = logs.pop(PAYLOAD_KEY)
            return logs, state
        logs = dict(self._function(*args))
        self.payload = logs.pop(PAYLOAD_KEY)
        return logs
