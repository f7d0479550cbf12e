"""`GradientMonitor`: every training step's own gradients, at almost no cost."""

from __future__ import annotations

import collections
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._alerts import Alerts, StepChecks
from keras_actgrad._arguments import (
    check_alert_arguments,
    check_log_dir,
    global_step,
    is_positive_int,
    writes_summaries,
)
from keras_actgrad._backends import (
    build_optimizer_before_tracing,
    processes,
    step_hooks,
)
from keras_actgrad._engine.distribution import check_distribution
from keras_actgrad._engine.step import Layout, MonitoredStep, StepConfig
from keras_actgrad._events import to_columns
from keras_actgrad._layers import select_layers
from keras_actgrad._probe import find_probes
from keras_actgrad._statistics.statistics import (
    DEFAULT_BINS,
    STATISTICS,
    Reduced,
    _unpack_histogram,
    check_statistics,
    finish_rows,
)
from keras_actgrad._tags import (
    GLOBAL_GRAD_NORM,
    WEIGHT_STATISTICS,
    global_summary_tag,
    log_key,
    weight_log_key,
)

# The event fields of `_tags.WEIGHT_STATISTICS`, in that order.
_WEIGHT_FIELDS = ("weight_grad_norms", "update_norms", "update_ratios")
# Running median of the global gradient norm: the last this many monitored
# steps, and a spike is only declared once this many have been seen.
SPIKE_WINDOW = 50
SPIKE_WARMUP = 5


class GradientMonitor(keras.callbacks.Callback):
    """Statistics of every training step's own gradients, from `fit` itself.

    On the steps it monitors, the monitor reads, at every `GradientProbe`,
    the gradient of the loss with respect to the probe's output **on the
    batch being trained**, in training mode, from the forward and backward
    pass that updates the weights: no second pass. The statistics are
    reduced on the device inside the compiled training step. Steps not
    monitored run Keras's own compiled step, untouched, so they cost nothing.
    Training is unchanged: weights, optimizer slots, metrics and
    random-generator state are those of `fit` without the monitor, bit for
    bit, except for the compilers' rounding in two cases (see the guide
    "Backends and reproducibility"):
    on TensorFlow, activation statistics (`act_*`, `dead_unit_fraction`,
    histograms) read the layer outputs, which can stop Grappler from
    merging additions (float32 rounding then differs); on JAX, XLA may round
    a convolutional network's monitored step differently.

    With `weight_gradients=True` it also records, per trainable variable,
    the L2 norm of the gradient the optimizer received (unscaled under
    `LossScaleOptimizer` or `loss_scale_factor`, **before** the optimizer's
    clipping: `clipnorm`, `clipvalue`, `global_clipnorm`), the global norm
    of all of them, the norm of the update the optimizer made, ||Δw||
    (everything the optimizer did: learning rate, momentum, weight decay,
    clipping), and ||Δw|| / ||w|| (w before the update).

    A trainable variable that gets no gradient (its output reaches no loss,
    e.g. an output without a loss, or only through `stop_gradient`) has a
    NaN gradient norm on every backend (on JAX, which differentiates it to
    zeros, the monitor tells it apart from a zero gradient), and the global
    gradient norm (`global_grad_norm`, and the one spike detection reads)
    is the norm of the gradients that exist, the ones the optimizer uses.
    A gradient that exists but holds a NaN or Inf makes it non-finite; such
    a step is no spike (the non-finite alert reports it). The update norm of
    a variable without a gradient is the update the optimizer really made:
    0 (Keras skips it on TensorFlow and PyTorch; on JAX it applies a zero
    gradient, which an optimizer's weight decay or momentum may still move).

    Compile modes: a step compiled with XLA (`jit_compile=True`, Keras's
    "auto" on a TensorFlow GPU machine) computes the statistics with ops
    XLA compiles; a model built under `keras.RematScope` keeps every tap
    outside the rematerialized calls; with `steps_per_execution` > 1, an
    execution that holds a monitored step runs its steps one call each and
    every monitored step is reported at its own global step (one without
    runs Keras's function untouched). See docs/guides/accelerators.md.

    Distribution: under `tf.distribute.MirroredStrategy` (TensorFlow) and
    `keras.distribution.DataParallel` or `ModelParallel` (JAX, in one
    process or in several whose device mesh spans them all: multi-host)
    the values are those of the global batch, equal to one device's: each
    replica gathers every replica's tapped tensors, and the weight-gradient
    norms are of the gradients summed over the replicas. With several JAX
    processes every process holds the same values; process 0 alone writes
    `log_dir` and gives the warnings. Other distributed setups are refused
    in `on_train_begin`.

    A model that overrides `train_step` (a GAN, a VAE, a distillation
    model; see the guide "A custom train_step") is measured in each
    backward pass its step takes (`tape.gradient`, `jax.grad` /
    `value_and_grad` / `vjp`, `loss.backward()` / `torch.autograd.grad`):
    with several passes, a tap's key is `<pass>/<probe>`, the pass named
    after the model attribute holding the optimizer that applied its
    gradients (`g_optimizer/disc_probe`), or `pass<i>`. Every optimizer the
    model holds is observed.

    Where the numbers go: `events` (kind `"step"`, `step` = global step
    after the update; the last `max_events`), TensorBoard
    (`<log_dir>/actgrad/`, step = global step: the global norm and the
    probes' statistics as scalars `actgrad_step.<statistic>/<probe>`, and
    every value, the weights' norms too, packed in one tensor per step,
    which `to_numpy`, `load_report` and the `actgrad` dashboard read), and
    the alerts of `ActivationGradientCallback` (non-finite, vanishing,
    exploding). Nothing goes to `logs` or the progress bar.

    Args:
        every_n_steps: Positive int: monitor the first step of each `fit`
            and every N-th after it (by global step: steps whose 0-based
            index is a multiple of N). Defaults to `1`.
        layers: The layers whose outputs are measured in place, selected as
            in `ActivationGradientCallback(layers=...)`; `None` measures the
            model's `GradientProbe`s. Defaults to `None`.
        statistics: Names of the statistics to compute (see
            `ActivationGradientCallback`), or `None` for all. Defaults to
            `("grad_norm",)`.
        weight_gradients: Whether to record the weight-gradient, update and
            update-ratio norms. Defaults to `True`.
        histograms_every_n_steps: Also compute gradient and activation
            histograms every N steps (`None`: never). Defaults to `None`.
        spike_factor: When the (finite) global gradient norm exceeds this
            factor times its running median (last 50 monitored steps, once 5
            are known), record that step in full (every statistic and
            histogram, computed on the device only on such a step) and warn
            once per spike, naming the step and the probe with the largest
            gradient. `None`: off.
        log_dir: TensorBoard log directory, or `None`. Defaults to `None`.
        on_nonfinite: What to do when a monitored step finds a NaN or Inf
            in its loss (`logs["loss"]`), a probe's gradient, a weight
            gradient or a weight after the update: `"warn"` (once per run),
            `"raise"` (a `FloatingPointError`, raised before the next step
            trains: the model keeps the weights that step made) or `"stop"`
            (warn and set `model.stop_training`). The message names the
            step and the first variable or probe. Under `LossScaleOptimizer`
            a step whose gradients are not finite while its loss and
            weights are is skipped by the optimizer by design (it lowers the
            loss scale): it alerts only if the loss scale was already 1 or
            less. These checks cost one reduction over the gradients and
            weights a monitored step (none more with `weight_gradients`).
            Defaults to `"warn"`.
        histogram_bins: Number of histogram bins. Defaults to `30`.
        vanishing_threshold: as in `ActivationGradientCallback`.
        exploding_threshold: as in `ActivationGradientCallback`.
        max_events: Positive int: `events` keeps the last this many step
            events (older ones are dropped, so that host memory stays flat
            over long runs), or `None` to keep every event. With a
            `log_dir`, `to_numpy` reads the whole run from the logs.
            Defaults to `1000`.

    Raises:
        ValueError: for invalid arguments (here), and in `on_train_begin` for
            a model without probes, Keras's NNX mode on JAX, a distributed
            setup other than those above, or a model that overrides
            `train_step` under a distribution; when the step is first traced
            (PyTorch: run), for a custom `train_step` whose backward passes
            reach no tap.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        *,
        layers: Any = None,
        statistics: Sequence[str] | None = ("grad_norm",),
        weight_gradients: bool = True,
        histograms_every_n_steps: int | None = None,
        spike_factor: float | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        on_nonfinite: str = "warn",
        histogram_bins: int = DEFAULT_BINS,
        vanishing_threshold: float = 1e-4,
        exploding_threshold: float = 1e4,
        max_events: int | None = 1000,
    ) -> None:
        super().__init__()
        if not is_positive_int(every_n_steps):
            raise ValueError(
                "`every_n_steps` must be a positive int (monitor every N "
                f"training steps). Received: every_n_steps={every_n_steps!r}."
            )
        self.layers = layers
        if histograms_every_n_steps is not None and not is_positive_int(
            histograms_every_n_steps
        ):
            raise ValueError(
                "`histograms_every_n_steps` must be a positive int or None "
                f"(no histograms). Received: "
                f"histograms_every_n_steps={histograms_every_n_steps!r}."
            )
        if spike_factor is not None and (
            not isinstance(spike_factor, numbers.Real)
            or isinstance(spike_factor, bool)
            or not math.isfinite(spike_factor)
            or spike_factor <= 1
        ):
            raise ValueError(
                "`spike_factor` must be a finite number greater than 1 (a spike "
                "is a global gradient norm above spike_factor times its running "
                f"median) or None (off). Received: spike_factor={spike_factor!r}."
            )
        check_alert_arguments(
            on_nonfinite, histogram_bins, vanishing_threshold, exploding_threshold
        )
        if max_events is not None and not is_positive_int(max_events):
            raise ValueError(
                "`max_events` must be a positive int (how many of the last step "
                "events `events` keeps) or None (keep them all). Received: "
                f"max_events={max_events!r}."
            )
        self.max_events = None if max_events is None else int(max_events)
        self.every_n_steps = int(every_n_steps)
        self.statistics = check_statistics(statistics, "statistics")
        self.weight_gradients = bool(weight_gradients)
        self.histograms_every_n_steps = (
            None if histograms_every_n_steps is None else int(histograms_every_n_steps)
        )
        self.spike_factor = None if spike_factor is None else float(spike_factor)
        self.log_dir = check_log_dir(log_dir)
        self.on_nonfinite = on_nonfinite
        self.histogram_bins = int(histogram_bins)
        self.vanishing_threshold = float(vanishing_threshold)
        self.exploding_threshold = float(exploding_threshold)
        computed = set(self.statistics) | {"grad_norm", "nonfinite"}
        self._computed = tuple(name for name in STATISTICS if name in computed)
        self.events: list[dict[str, Any]] = []
        self.probe_order: list[str] = []
        self._steps: dict[bool, MonitoredStep] = {}
        self._steps_model: keras.Model | None = None
        self._plain: Any = None
        self._plain_step: Any = None
        self._writer: Any = None
        # The event files this monitor wrote, and whether every event since
        # the first reached them (then `to_numpy` reads the run from them).
        self._log_files: list[str] = []
        self._logs_complete = True
        self._columns: tuple[Any, list[str]] = ((), [])
        self._alerts = Alerts(on_nonfinite, vanishing_threshold, exploding_threshold)
        self._norms: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)
        self._in_spike = False
        self._step = 0
        self._epoch = 0
        self._active = False
        self._fit_model: Any = None
        self._sites: tuple[Any, ...] = ()
        self._passes: list[list[str]] = []
        self._loss_scaling = False
        # A `FloatingPointError` of on_nonfinite="raise", raised at the next
        # hook (see `_raise_pending`).
        self._pending: FloatingPointError | None = None

    # Keras hooks.

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        sites = () if self.layers is None else select_layers(model, self.layers)
        # Keras's `Callback.model` syncs JAX's training state into the
        # variables on every access; between steps the monitor uses this
        # reference instead (a sync mid-step would hand Keras donated buffers).
        self._fit_model = model
        _check_not_nnx(model)
        _check_model(model, probes=not sites)
        # The first step (the monitored one and Keras's) traced once.
        build_optimizer_before_tracing(model)
        if self._steps_model is not model or self._sites != sites:
            self._steps = {}
            self._plain_step = None
            self._steps_model = model
            self._sites = sites
        self._plain = model.train_function
        self._execution = int(getattr(model, "steps_per_execution", 1) or 1)
        self._step = global_step(model)
        self._alerts.reset()
        self._pending = None
        self._loss_scaling = isinstance(
            model.optimizer, keras.optimizers.LossScaleOptimizer
        )
        self._in_spike = False
        order = (
            [site.name for site in sites]
            if sites
            else [p.name for p in find_probes(model)]
        )
        self.probe_order = order
        self._passes = []
        if (
            self.log_dir is not None
            and self._writer is None
            and writes_summaries(model)
        ):
            from keras_actgrad._tensorboard import EventWriter

            try:
                self._writer = EventWriter(
                    self.log_dir,
                    thresholds={
                        "vanishing": self.vanishing_threshold,
                        "exploding": self.exploding_threshold,
                    },
                )
            except OSError as error:
                raise ValueError(
                    "GradientMonitor cannot write TensorBoard summaries to "
                    f"`log_dir`: {error}. Pass a writable directory, or "
                    f"log_dir=None. Received: log_dir={self.log_dir!r}."
                ) from error
            self._log_files.append(self._writer.path)
        # The monitored steps are built now: under a `keras.distribution`,
        # Keras's JAX trainer reads the variables' shardings when it builds a
        # train function, and `fit` detaches the variables' values from its
        # first step on. (Building traces nothing: that happens on first use.)
        for histograms in (False, True) if self.histograms_every_n_steps else (False,):
            self._monitored(histograms)
        if self._execution > 1 and self._plain_step is None:
            self._plain_step = step_hooks().make_train_function(
                model, type(model).train_step.__get__(model)
            )
        self._active = True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        if self._execution > 1:
            # The last execution of an epoch may run fewer steps than
            # `steps_per_execution` (the data ran out): the global step is
            # read again (Keras has synced the state into the variables).
            self._step = global_step(self._fit_model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_pending()

    def on_train_batch_begin(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        self._raise_pending()
        index = self._step  # updates done before this step
        if self._execution > 1:
            self._begin_execution(index, batch)
            return
        histograms = bool(
            self.histograms_every_n_steps and index % self.histograms_every_n_steps == 0
        )
        if index % self.every_n_steps == 0 or histograms:
            self._fit_model.train_function = self._monitored(histograms)
        else:
            self._fit_model.train_function = self._plain
        self._step = index + 1

    def _plan(self, index: int) -> tuple[bool, bool]:
        """Whether the step after `index` updates is monitored, with histograms."""
        histograms = bool(
            self.histograms_every_n_steps and index % self.histograms_every_n_steps == 0
        )
        return index % self.every_n_steps == 0 or histograms, histograms

    def _begin_execution(self, index: int, batch: int) -> None:
        """`steps_per_execution` > 1: the steps of one execution.

        An execution without a monitored step runs Keras's own function (its
        steps in one call); one with a monitored step runs its steps one
        call each (Keras's JAX trainer does so too), each monitored step with
        the monitored function and reported at its own global step, the
        others with Keras's own single step. The last execution of an epoch
        runs the steps left (`params["steps"]`, when known; else until the
        data runs out, as Keras's does).
        """
        size = self._execution
        steps = (self.params or {}).get("steps")
        if steps:
            size = max(min(size, int(steps) - int(batch)), 1)
        plan = [self._plan(index + k) for k in range(size)]
        model = self._fit_model
        if not any(monitored for monitored, _ in plan):
            model.train_function = self._plain
            self._step = index + size
            return
        hooks = step_hooks()
        stateless = hooks.stateless

        def train_function(*args: Any) -> Any:
            state = args[0] if stateless else None
            iterator = args[-1]
            out: Any = None
            for k, (monitored, histograms) in enumerate(plan):
                plain = self._plain_step
                function = self._monitored(histograms) if monitored else plain
                self._step = index + k + 1
                try:
                    if stateless:
                        out = function(state, iterator)
                        state = out[1]
                    else:
                        out = function(iterator)
                except hooks.end_of_data:
                    self._step = index + k
                    if k == 0:
                        raise
                    break
            return out

        model.train_function = train_function

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._fit_model.train_function = self._plain
        self._active = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _raise_pending(self) -> None:
        """Raises the alert of on_nonfinite="raise", after the step's end.

        A step's alert is found inside the train function; it is raised at
        the next hook (the next step's start or the epoch's end), before
        the next update: `fit` has then stored the step's state (JAX keeps
        it outside the variables during an epoch), so the model holds the
        weights that step made. `fit` then ends without `on_train_end`,
        so the monitor restores Keras's train function and closes its
        writer first.
        """
        error, self._pending = self._pending, None
        if error is None:
            return
        self.on_train_end()
        raise error

    # The monitored steps.

    def _config(self, histograms: bool) -> StepConfig:
        return StepConfig(
            statistics=self._computed,
            bins=self.histogram_bins if histograms else 0,
            weight_gradients=self.weight_gradients,
            spike_bins=self.histogram_bins if self.spike_factor else 0,
        )

    def _monitored(self, histograms: bool) -> Any:
        if histograms not in self._steps:
            self._steps[histograms] = MonitoredStep(
                self._fit_model, self._config(histograms), self._sites
            )
        step = self._steps[histograms]
        if self.spike_factor is not None:
            step.set_threshold(self._spike_threshold())

        def train_function(*args: Any) -> Any:
            out = step.function(*args)
            self._record(step, self._step)
            return out

        return train_function

    def _spike_threshold(self) -> float:
        if len(self._norms) < SPIKE_WARMUP or self.spike_factor is None:
            return math.inf
        return self.spike_factor * float(np.median(self._norms))

    def _record(self, monitored: MonitoredStep, step: int) -> None:
        vector = np.asarray(keras.ops.convert_to_numpy(monitored.payload), np.float64)
        monitored.payload = None
        if monitored.custom and monitored.layout is not None:
            # A custom step's keys (`<pass>/<probe>` for several passes),
            # known once traced: those of its last trace, in reading order.
            self.probe_order = list(monitored.layout.order)
            self._passes = list(monitored.layout.passes)
        event = unpack(vector, monitored.layout, monitored.config, step, self._epoch)
        event["spike_threshold"] = monitored.threshold
        self._finish_event(event, unpack_checks(vector, monitored.layout))

    def _finish_event(
        self, event: dict[str, Any], checks: StepChecks | None = None
    ) -> None:
        statistics = event["statistics"]
        order = [name for name in self.probe_order if name in statistics]
        order += [name for name in statistics if name not in order]
        nan = dict.fromkeys(self.statistics, math.nan)
        event["statistics"] = {
            probe: {
                name: statistics.get(probe, nan).get(name, math.nan)
                for name in (STATISTICS if event["spike"] else self.statistics)
            }
            for probe in self.probe_order
        }
        global_norm = event["global_grad_norm"]
        if self.spike_factor is not None and math.isfinite(global_norm):
            if event["spike"]:
                if not self._in_spike:
                    self._warn_spike(event)
                self._in_spike = True
            else:
                self._in_spike = False
            self._norms.append(global_norm)
        if not self.weight_gradients:
            for key in ("weight_grad_norms", "update_norms", "update_ratios"):
                event[key] = {}
        self.events.append(event)
        if self.max_events is not None and len(self.events) > self.max_events:
            del self.events[: len(self.events) - self.max_events]
        if self._writer is not None:
            # Stock scalars for TensorBoard's dashboards (the global norm and
            # the probes' statistics); every value, weights too, packed.
            names = list(STATISTICS if event["spike"] else self.statistics)
            reduced = Reduced(
                {p: event["statistics"][p] for p in self.probe_order},
                event["histograms"],
                {},
            )
            scalars = {global_summary_tag("step"): event["global_grad_norm"]}
            written = self._writer.write(
                "step",
                event["step"],
                reduced,
                names,
                self.probe_order,
                scalars,
                self._packed(event, names),
            )
            self._logs_complete = self._logs_complete and written
        # On what the step computed (`nonfinite` and `grad_norm` always),
        # not only the statistics the event reports.
        self._alert(event["step"], statistics, checks)

    def _packed(
        self, event: dict[str, Any], names: list[str]
    ) -> tuple[list[str], list[float]]:
        """`(columns, values)` of an event: every value, keyed as `to_numpy`."""
        fields = [f for f in _WEIGHT_FIELDS if event[f]]
        paths = [list(event[f]) for f in fields]
        key = (tuple(names), tuple(self.probe_order), tuple(fields), str(paths))
        if key != self._columns[0]:
            columns = ["epoch", GLOBAL_GRAD_NORM]
            columns += [log_key(p, n) for p in self.probe_order for n in names]
            for field, names_of in zip(fields, paths, strict=True):
                statistic = WEIGHT_STATISTICS[_WEIGHT_FIELDS.index(field)]
                columns += [weight_log_key(path, statistic) for path in names_of]
            self._columns = (key, columns)
        statistics = event["statistics"]
        values = [float(event["epoch"]), event["global_grad_norm"]]
        values += [statistics[p][n] for p in self.probe_order for n in names]
        for field in fields:
            values += event[field].values()
        return self._columns[1], values

    # Alerts.

    def _warn_spike(self, event: dict[str, Any]) -> None:
        if processes().index() != 0:
            return  # every process detects it; process 0 warns
        norms = {
            probe: values.get("grad_norm", math.nan)
            for probe, values in event["statistics"].items()
        }
        finite = {p: v for p, v in norms.items() if math.isfinite(v)}
        largest = max(finite, key=finite.__getitem__) if finite else None
        where = (
            f" The probe with the largest gradient is '{largest}' "
            f"(grad_norm {finite[largest]:.3g})."
            if largest
            else ""
        )
        warnings.warn(
            f"Gradient spike at training step {event['step']} of model "
            f"'{self._fit_model.name}': global gradient norm "
            f"{event['global_grad_norm']:.3g} is above spike_factor="
            f"{self.spike_factor:g} times its running median "
            f"({event['spike_threshold'] / self.spike_factor:.3g}).{where} The "
            "step is recorded in full (every statistic and histogram) in "
            "`events` and TensorBoard.",
            stacklevel=2,
        )

    def _alert(
        self,
        step: int,
        statistics: dict[str, dict[str, float]],
        checks: StepChecks | None = None,
    ) -> None:
        note = (
            f" (The monitor checks one step in {self.every_n_steps}: it may "
            "have started at an earlier one.)"
            if self.every_n_steps > 1
            else ""
        )
        try:
            if checks is not None and self._alerts.check_step(
                self._fit_model,
                step,
                checks,
                self.probe_order,
                statistics,
                self._loss_scaling,
                note,
            ):
                return  # a step LossScaleOptimizer skipped: no alert
            # A custom step's passes are checked one by one: the
            # first-to-last ratio compares the taps of one backward pass.
            for order in self._passes or [self.probe_order]:
                self._alerts.check(
                    self._fit_model, f"at training step {step}", order, statistics
                )
        except FloatingPointError as error:
            self._pending = error

    # In-memory results.

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The step events as NumPy arrays, one per key, one entry per event.

        With a `log_dir`, every monitored step of the monitor's `fit` calls,
        read from the event files it wrote (`events` keeps only the last
        `max_events`); without one (or if a write failed), the steps in
        `events`.

        Returns:
            A dict with `"epoch"`, `"step"` (global step), `"global_grad_norm"`,
            one array per `actgrad/<probe>/<statistic>` key (NaN where a step
            did not compute it: a spike step computes every statistic), and
            per variable `actgrad_weights/<path>/grad_norm`, `.../update_norm`
            and `.../update_ratio`.
        """
        if self._log_files and self._logs_complete:
            from keras_actgrad._eventfile import read_file, table

            steps, read, _ = table([read_file(path) for path in self._log_files])
            return {"epoch": read.pop("epoch"), "step": steps, **read}
        columns = to_columns(self.events, "step", ("step",))
        columns[GLOBAL_GRAD_NORM] = np.asarray(
            [event["global_grad_norm"] for event in self.events], np.float64
        )
        for statistic, field in zip(WEIGHT_STATISTICS, _WEIGHT_FIELDS, strict=True):
            paths: dict[str, None] = {}
            for event in self.events:
                paths.update(dict.fromkeys(event[field]))
            for path in paths:
                columns[weight_log_key(path, statistic)] = np.asarray(
                    [event[field].get(path, math.nan) for event in self.events],
                    np.float64,
                )
        return columns


def unpack(
    vector: np.ndarray, layout: Layout | None, config: StepConfig, step: int, epoch: int
) -> dict[str, Any]:
    """One monitored step's vector as an event (host side)."""
    if layout is None:
        raise RuntimeError("Internal error: the monitored step was never traced.")
    statistics: dict[str, dict[str, float]] = {}
    histograms: dict[str, Any] = {}
    size = config.row_size()
    moments = config.moments
    offset = len(layout.probes) * size
    table = vector[:offset].reshape(len(layout.probes), size)
    statistics.update(
        finish_rows(config.statistics, moments, table[:, : len(moments)], layout.probes)
    )
    for name, row in zip(layout.probes, table, strict=True):
        if config.bins:
            width = 2 + config.bins
            start = len(moments)
            histograms[name] = {
                "gradient": _unpack_histogram(row[start : start + width]),
                "activation": _unpack_histogram(row[start + width : start + 2 * width]),
            }
    n = layout.weights
    grad_sq = update_sq = weight_sq = np.zeros((0,))
    if n:
        block = vector[offset : offset + 3 * n].reshape(3, n)
        offset += 3 * n
        grad_sq, update_sq, weight_sq = block
    spike = False
    if layout.spike:
        full_size = config.full_row_size()
        count = len(layout.full_probes)
        full = vector[offset : offset + count * full_size].reshape(count, full_size)
        offset += count * full_size
        spike = bool(vector[offset] > 0.5)
        if spike:
            full_moments = config.full_moments
            statistics.update(
                finish_rows(
                    STATISTICS,
                    full_moments,
                    full[:, : len(full_moments)],
                    layout.full_probes,
                )
            )
            for name, row in zip(layout.full_probes, full, strict=True):
                width = 2 + config.spike_bins
                start = len(full_moments)
                histograms[name] = {
                    "gradient": _unpack_histogram(row[start : start + width]),
                    "activation": _unpack_histogram(
                        row[start + width : start + 2 * width]
                    ),
                }
    paths = list(layout.weight_paths)
    with np.errstate(all="ignore"):
        grad_norms = np.sqrt(grad_sq)
        update_norms = np.sqrt(update_sq)
        ratios = update_norms / np.sqrt(weight_sq)
        global_norm = (
            global_grad_norm(grad_sq, layout.weight_has_gradient) if n else math.nan
        )
    return {
        "kind": "step",
        "epoch": epoch,
        "step": int(step),
        "statistics": statistics,
        "histograms": histograms,
        "weight_grad_norms": dict(zip(paths, map(float, grad_norms), strict=True)),
        "update_norms": dict(zip(paths, map(float, update_norms), strict=True)),
        "update_ratios": dict(zip(paths, map(float, ratios), strict=True)),
        "global_grad_norm": global_norm,
        "spike": spike,
    }


def unpack_checks(vector: np.ndarray, layout: Layout | None) -> StepChecks:
    """The non-finite checks at the end of a monitored step's vector."""
    if layout is None:
        raise RuntimeError("Internal error: the monitored step was never traced.")
    size = 2 * len(layout.checked) + 2
    return StepChecks.unpack(vector[-size:], layout.checked)


def global_grad_norm(grad_sq: np.ndarray, has_gradient: Sequence[bool]) -> float:
    """The global gradient norm: over the gradients that exist.

    The variables without a gradient (NaN in `grad_sq`, known at trace
    time: `Layout.weight_has_gradient`) are left out, as the optimizer
    skips them; a non-finite gradient that exists makes it non-finite. The
    spike decision on the device uses the same sum (`_Trace.global_sq_norm`).
    """
    present = np.asarray(has_gradient, bool)
    return float(np.sqrt(np.sum(grad_sq[present], dtype=np.float64)))


def _check_not_nnx(model: keras.Model) -> None:
    # Keras's NNX mode (JAX, `keras.config.is_nnx_enabled()`, Keras >= 3.11):
    # the trainer builds its step from the model class's `train_step`, so the
    # monitored step the monitor installs would never run.
    is_nnx_enabled = getattr(keras.config, "is_nnx_enabled", None)
    if keras.backend.backend() != "jax" or is_nnx_enabled is None:
        return
    if is_nnx_enabled():
        raise ValueError(
            "`GradientMonitor` does not support Keras's NNX mode on JAX: under "
            "NNX the trainer builds its training step from the model's class, so "
            "the monitor cannot observe the step of model "
            f"'{model.name}'. Use `keras_actgrad.ActivationGradientCallback` "
            "(a separate probe pass, e.g. `batch_freq=1` for every step), or turn "
            "NNX off (unset `KERAS_NNX_ENABLED`). Received: "
            "keras.config.is_nnx_enabled()=True."
        )


def _check_model(model: keras.Model, probes: bool = True) -> None:
    if probes and not find_probes(model):
        raise ValueError(
            f"`GradientMonitor` found no `GradientProbe` in model '{model.name}'. "
            "Add probes with `keras_actgrad.insert_probes(model)` or place "
            "`GradientProbe()` layers yourself. Received: model with "
            f"{len(model.layers)} layers, 0 probes."
        )
    check_distribution(model)
    strategy = getattr(model, "distribute_strategy", None)
    replicas = getattr(strategy, "num_replicas_in_sync", 1)
    distributed = keras.distribution.distribution() is not None or replicas > 1
    if type(model).train_step is not keras.Model.train_step and distributed:
        raise ValueError(
            "`GradientMonitor` measures a custom `train_step` on one device "
            f"only, but model '{model.name}' is a {type(model).__name__} whose "
            "class overrides `train_step` and is trained under a distribution. "
            "Train it without the distribution while monitoring. Received: "
            f"{type(model).__qualname__}.train_step under a distribution."
        )
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"`GradientMonitor` needs a compiled model with an optimizer. "
            f"Received: model '{model.name}' with optimizer=None."
        )
