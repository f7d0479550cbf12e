"""`ActivationGradientCallback`: per-probe gradient statistics while training."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad import _alerts
from keras_actgrad._arguments import (
    FreqSpec,
    check_alert_arguments,
    check_freq,
    check_log_dir,
    first_batch,
    global_step,
    is_positive_int,
    writes_summaries,
)
from keras_actgrad._backends import build_optimizer_before_tracing, processes
from keras_actgrad._backends.base import LossSpec, PassConfig
from keras_actgrad._engine import Batch, ProbeEngine, get_engine
from keras_actgrad._engine.chunked import reduce_chunks
from keras_actgrad._engine.distribution import check_processes
from keras_actgrad._engine.inputs import batch_size, standardize
from keras_actgrad._engine.losses import check_loss
from keras_actgrad._events import history, to_columns
from keras_actgrad._layers import Layers, Site, select_layers
from keras_actgrad._statistics import chunks
from keras_actgrad._statistics.nonfinite import nonfinite_variables
from keras_actgrad._statistics.statistics import (
    DEFAULT_BINS,
    STATISTICS,
    Reduced,
    StatisticsReducer,
    check_statistics,
)
from keras_actgrad._tags import (
    EXPLODING_RATIO,
    RATIO_LOG_KEY,
    VANISHING_RATIO,
    log_key,
)


class ActivationGradientCallback(keras.callbacks.Callback):
    """Logs, per `GradientProbe`, statistics of d loss / d activation.

    At the chosen epochs the callback runs one probe pass (one compiled
    forward and backward pass, no weight updates) over a fixed probe batch
    and reduces each probe's activation and gradient to a few numbers on the
    device. The numbers go to `logs` (so `History`, `CSVLogger`,
    `EarlyStopping` and Keras's `TensorBoard` see them), to TensorBoard
    through the callback's own writer in `<log_dir>/actgrad/`, and to
    `self.events` in memory. Probing never changes training: weights,
    BatchNormalization statistics, optimizer slots and random generators are
    left exactly as they were.

    Place this callback *before* `TensorBoard`, `CSVLogger` and
    `EarlyStopping` in the `callbacks` list: Keras calls callbacks in order,
    and they only see the `actgrad/...` keys once this callback has added
    them to `logs`.

    Model-dependent checks happen in `on_train_begin`, which runs one probe
    pass before the first batch trains: a model without probes, a probe
    batch that does not fit the model, or an unwritable `log_dir` fail there,
    before any weight moves.

    Args:
        probe_data: The probe batch, fixed for the whole run so that epochs
            compare: `(x, y)`, `(x, y, sample_weight)`, `x` alone (when the
            loss needs no labels, e.g. `loss="sum"`), with `x` an array, a
            list or a dict of arrays; or a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or any iterable/generator of such
            batches, of which the first batch is taken once, here. Under
            several JAX processes with a `keras.distribution` over them,
            each process passes its own share of the global probe batch or
            the same whole batch (checked when training starts).
        log_dir: String, the TensorBoard log directory (the one given to
            `keras.callbacks.TensorBoard`, if any). Summaries go to
            `<log_dir>/actgrad/`. `None` writes no summaries. Under a
            multi-worker `tf.distribute` strategy only the chief writes, and
            under several JAX processes (multi-host) only process 0; the
            others compute the same statistics and `logs`. Defaults to
            `None`.
        freq: When to probe, by 0-based epoch index: an int `N` (epochs
            with `epoch % N == 0`), a list of epoch indices, or a callable
            `epoch -> bool`. Defaults to `1` (every epoch).
        loss: The loss whose gradient is measured: `"model"` (the compiled
            training loss), `"sum"`, a Keras loss name, a callable
            `loss(y_true, y_pred)`, or `keras_actgrad.TrainingLoss(function)`
            for a model that overrides `train_step` (`function(model, data)
            -> scalar`, `data` being `x` or `(x, y)`), as in
            `activation_gradients`. Defaults to `"model"`.
        statistics: Names of the statistics to compute and write to
            TensorBoard and `events` (see the guide "Statistics"), or
            `None` for all of them. Defaults to `None`.
        log_statistics: Statistics also written to `logs` (and so to the
            progress bar, `History`, `CSVLogger`, `EarlyStopping`) per probe,
            as `actgrad/<probe>/<statistic>`: a subset of `statistics`, or
            `None` for none. By default `logs` gets one compact value,
            `actgrad/grad_norm_ratio` (the first probe's `grad_norm` over the
            last probe's, the ratio the vanishing / exploding alerts watch;
            left out for a model with a single probe). On epochs that are not
            probed (`freq`), every `actgrad` key carries the last measured
            value (before the first probed epoch: the value of the check pass
            before training), so that `History` and `CSVLogger` get one row
            per epoch and the progress bar never shows `nan` for an epoch
            that was not measured; `callback.history` and `events` hold the
            probed epochs only. Defaults to `None`.
        histograms: Whether to compute histograms of each probe's gradient
            and activation (on the device, `histogram_bins` bins). Defaults
            to `True`.
        on_nonfinite: What to do when a probe's gradient has NaN or Inf
            entries (with `weight_gradients`, also a weight gradient of the
            probe pass, or a weight): `"warn"` (once per run), `"raise"` (a
            `FloatingPointError`) or `"stop"` (warn and set
            `model.stop_training`). Defaults to `"warn"`.
        weight_gradients: Whether to also compute, from the same backward
            pass, the L2 norm of each trainable weight's gradient (written
            to TensorBoard as `actgrad_weights.grad_norm/<variable path>`
            and kept in `events`). Defaults to `False`.
        probe_at_start: Whether to record one event before the first
            update (TensorBoard tags `actgrad_start.<statistic>/<probe>`,
            step = global step). Defaults to `False`.
        batch_freq: Also probe every `batch_freq` training steps
            (TensorBoard tags `actgrad_batch.<statistic>/<probe>`, step =
            global step; not in `logs`). `None` turns it off. Defaults to `None`.
        training: Whether layers run in training mode during the probe
            pass (Dropout on, BatchNormalization on batch statistics);
            state updates are discarded either way. Defaults to `False`.
        histogram_bins: Number of histogram bins. Defaults to `30`.
        vanishing_threshold: Warn (once per run) when the first probe's
            `grad_norm` divided by the last probe's falls below this.
            Defaults to `1e-4`.
        exploding_threshold: Warn (once per run) when that ratio rises
            above this. Defaults to `1e4`.
        profile_images: Whether to also write, at every epoch event, an
            image `actgrad/grad_norm_profile` for TensorBoard's Images tab:
            every probe's `grad_norm` as a bar chart on a log scale, so the
            layer where the gradient vanishes stands out. Needs `log_dir`
            and matplotlib (`pip install "keras-actgrad[report]"`). Off by
            default: drawing costs about 0.1 s per event on a CPU, more
            than a probe pass of a small model. Defaults to `False`.
        probe_batch_size: Run the probe batch in consecutive chunks of at
            most this many examples, one pass each, and combine their
            results into the whole batch's: probes 4096 examples on a
            device that trains 256. Every statistic (sums, maxima, counts,
            means, the variance, dead units; each chunk's gradient scaled
            by its share of a loss averaged over the batch) and the
            weight-gradient norms (of the chunks' gradients, summed on the
            device: one more copy of the weights) equal the whole batch's
            up to float32 rounding; histogram counts equal them exactly (a
            first, cheaper pass over the chunks finds the whole batch's
            range, only when `histograms` is on; an entry within float32
            rounding of a bin edge may still fall either side). Needs a
            loss averaged or summed over the batch, `training=False` for
            layers whose output depends on the batch (BatchNormalization)
            and, under a summed `loss="model"`, no activity regularizers
            (Keras averages them over the batch) nor, with
            `weight_gradients`, weight regularization (it would count once
            per chunk). `None` runs the batch whole. Defaults to `None`.
        layers: Measure at the outputs of these layers, in place, instead
            of at the model's probes (the model is left as it was): names
            or paths, globs on paths, classes, layer objects or a predicate,
            as `activation_gradients` takes them. Checked when training
            starts. `None` (the default) uses the model's `GradientProbe`s.

    Attributes:
        events: List of the recorded probe events, each a dict with keys
            `"kind"` (`"epoch"`, `"start"` or `"batch"`), `"epoch"`,
            `"step"`, `"statistics"` (`{probe: {statistic: float}}`),
            `"histograms"` (`{probe: {"gradient" | "activation":
            (low, high, counts)}}`) and `"weight_grad_norms"`
            (`{variable path: float}`).
        probe_order: Probe names in forward order (after `on_train_begin`).

    Example:

    ```python
    callback = keras_actgrad.ActivationGradientCallback(
        (x[:256], y[:256]), log_dir="logs"
    )
    model.fit(
        x, y, epochs=5,
        callbacks=[callback, keras.callbacks.TensorBoard("logs")],
    )
    callback.history  # {"epoch": [...], "actgrad/dense_probe/grad_norm": [...]}
    ```
    """

    def __init__(
        self,
        probe_data: Any,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        freq: FreqSpec = 1,
        loss: LossSpec = "model",
        statistics: Sequence[str] | None = None,
        log_statistics: Sequence[str] | None = None,
        histograms: bool = True,
        on_nonfinite: str = "warn",
        weight_gradients: bool = False,
        probe_at_start: bool = False,
        batch_freq: int | None = None,
        training: bool = False,
        histogram_bins: int = DEFAULT_BINS,
        vanishing_threshold: float = VANISHING_RATIO,
        exploding_threshold: float = EXPLODING_RATIO,
        profile_images: bool = False,
        probe_batch_size: int | None = None,
        layers: Layers | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self._sites: tuple[Site, ...] = ()
        self.freq = check_freq(freq)
        if batch_freq is not None and not is_positive_int(batch_freq):
            raise ValueError(
                "`batch_freq` must be a positive int (probe every N training "
                f"steps) or None (off). Received: batch_freq={batch_freq!r}."
            )
        self.batch_freq = batch_freq
        check_alert_arguments(
            on_nonfinite, histogram_bins, vanishing_threshold, exploding_threshold
        )
        self.on_nonfinite = on_nonfinite
        self.statistics = check_statistics(statistics, "statistics")
        if log_statistics is None:
            log_statistics = ()
        if isinstance(log_statistics, str):
            log_statistics = (log_statistics,)
        log_statistics = tuple(log_statistics)
        if log_statistics:
            log_statistics = check_statistics(log_statistics, "log_statistics")
        missing = [name for name in log_statistics if name not in self.statistics]
        if missing:
            raise ValueError(
                f"`log_statistics` {missing} are not among the computed "
                f"`statistics` {list(self.statistics)}. Add them to "
                "`statistics` (or pass `statistics=None` for all). Received: "
                f"log_statistics={list(log_statistics)!r}."
            )
        self.log_statistics = log_statistics
        check_loss(loss)
        self.loss = loss
        self.log_dir = check_log_dir(log_dir)
        if profile_images and self.log_dir is None:
            raise ValueError(
                "`profile_images=True` writes TensorBoard images, so it needs "
                "`log_dir`. Pass `log_dir=...` or drop `profile_images`. "
                "Received: profile_images=True, log_dir=None."
            )
        if profile_images and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "`profile_images=True` draws its bar charts with matplotlib, "
                "which is not installed. Install it with "
                '`pip install "keras-actgrad[report]"` or drop `profile_images`. '
                "Received: profile_images=True."
            )
        self.profile_images = bool(profile_images)
        self.histograms = bool(histograms)
        self.histogram_bins = int(histogram_bins)
        self.weight_gradients = bool(weight_gradients)
        self.probe_at_start = bool(probe_at_start)
        self.training = bool(training)
        self.vanishing_threshold = float(vanishing_threshold)
        self.exploding_threshold = float(exploding_threshold)
        if probe_batch_size is not None and not is_positive_int(probe_batch_size):
            raise ValueError(
                "`probe_batch_size` must be a positive int (the largest chunk "
                "of the probe batch run at once) or None (the whole batch). "
                f"Received: probe_batch_size={probe_batch_size!r}."
            )
        self.probe_batch_size = probe_batch_size
        self._x, self._y, self._sample_weight = first_batch(probe_data)
        computed = set(self.statistics) | {"grad_norm", "nonfinite"}
        self._reducer = StatisticsReducer(
            statistics=tuple(name for name in STATISTICS if name in computed),
            bins=self.histogram_bins if self.histograms else 0,
        )
        self.events: list[dict[str, Any]] = []
        self.probe_order: list[str] = []
        self._engine: ProbeEngine | None = None
        self._writer: Any = None
        self._alerts = _alerts.Alerts(
            on_nonfinite, self.vanishing_threshold, self.exploding_threshold
        )
        self._step = 0
        self._epoch_start_step = 0
        self._epoch = 0
        self._batch: Batch | None = None
        self._chunks: list[Batch] = []
        self._chunk_rows: list[int] = []
        self._mean_loss = True
        self._checked_model: keras.Model | None = None
        self._logs: dict[str, float] = {}  # the last measured `logs` values
        if batch_freq is not None:
            self.on_train_batch_end = self._on_train_batch_end

    # Keras hooks.

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        check_processes("`ActivationGradientCallback`")
        self._alerts.reset()
        self._engine = get_engine(self.model)
        self._step = global_step(self.model)
        self._epoch_start_step = self._step
        # Keras's first step then traced once, not twice.
        build_optimizer_before_tracing(self.model)
        # The checks: one probe pass before the first batch (once per model;
        # a later `fit` reuses the checked batch and the compiled pass).
        reduced = None
        if self.probe_at_start or self._checked_model is not self.model:
            if self.layers is not None:
                self._sites = select_layers(self.model, self.layers)
            if processes().spanning():
                # Several JAX processes: each one's share (or the same whole
                # batch) becomes the global batch, the same on every process.
                self._x, self._y, self._sample_weight = processes().global_batch(
                    standardize(self._x),
                    standardize(self._y),
                    standardize(self._sample_weight),
                )
            # In chunks, only the chunks move to the device.
            self._chunks = self._split()
            self._batch = (
                self._chunks[0]
                if self._chunks
                else self._engine.prepare(
                    self._x, self._y, self._sample_weight, self.loss
                )
            )
            reduced = self._probe()
            self._checked_model = self.model
            self._logs = self._log_values(reduced)
        if (
            self.log_dir is not None
            and self._writer is None
            and writes_summaries(self.model)
        ):
            from keras_actgrad._tensorboard import EventWriter

            try:
                self._writer = EventWriter(
                    self.log_dir,
                    self.profile_images,
                    thresholds={
                        "vanishing": self.vanishing_threshold,
                        "exploding": self.exploding_threshold,
                    },
                )
            except OSError as error:
                raise ValueError(
                    "ActivationGradientCallback cannot write TensorBoard summaries "
                    f"to `log_dir`: {error}. Pass a writable directory, or "
                    f"log_dir=None to write none. Received: log_dir={self.log_dir!r}."
                ) from error
        if self.probe_at_start and reduced is not None:
            self._record("start", None, self._step, reduced)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._epoch_start_step = self._step

    def _on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        # Installed as `on_train_batch_end` only with `batch_freq` (see
        # `__init__`): Keras syncs with the device after every step when any
        # callback overrides a batch hook, so without `batch_freq` the
        # callback leaves the hook alone and costs nothing between epochs.
        previous = self._step
        # With `steps_per_execution` > 1, Keras (3.11 and later) passes the
        # last step of the execution, which for the last execution of an
        # epoch can be past the epoch's end: the steps really run count.
        steps = (self.params or {}).get("steps")
        batch = int(batch) if not steps else min(int(batch), int(steps) - 1)
        self._step = self._epoch_start_step + batch + 1
        if (
            self.batch_freq
            and self._step // self.batch_freq > previous // self.batch_freq
        ):
            self._record("batch", self._epoch, self._step, self._probe())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            logs = {}
        if self._scheduled(epoch):
            reduced = self._probe()
            self._record("epoch", epoch, epoch, reduced)
            self._logs = self._log_values(reduced)
        logs.update(self._logs)

    def _log_values(self, reduced: Reduced) -> dict[str, float]:
        """The `logs` entries of one probe pass: the ratio, then per probe."""
        out: dict[str, float] = {}
        if len(self.probe_order) > 1:
            norms = [
                (probe, reduced.statistics.get(probe, {}).get("grad_norm", math.nan))
                for probe in self.probe_order
            ]
            found = _alerts.first_to_last(norms)
            out[RATIO_LOG_KEY] = math.nan if found is None else found[-1]
        for probe in self.probe_order:
            values = reduced.statistics.get(probe, {})
            for statistic in self.log_statistics:
                out[log_key(probe, statistic)] = values.get(statistic, math.nan)
        return out

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # Probe passes.

    def _scheduled(self, epoch: int) -> bool:
        if callable(self.freq):
            return bool(self.freq(epoch))
        if isinstance(self.freq, int):
            return epoch % self.freq == 0
        return epoch in self.freq

    def _probe(self) -> Reduced:
        engine, batch = self._engine, self._batch
        if engine is None or batch is None:
            raise RuntimeError(
                "ActivationGradientCallback probes only during `fit` (after "
                "`on_train_begin`). Pass it to `model.fit(callbacks=[...])`."
            )
        config = PassConfig(
            loss=self.loss,
            training=self.training,
            weight_gradients=self.weight_gradients,
            reducer=self._reducer,
            sites=self._sites,
        )
        if self._chunks:
            reducer = chunks.ChunkReducer(
                self._reducer.statistics,
                self._reducer.bins,
                scale_gradients=self._mean_loss,
            )
            reduced, last = reduce_chunks(
                engine,
                self._chunks,
                self._chunk_rows,
                dataclasses.replace(config, reducer=reducer),
                self._mean_loss,
            )
            self.probe_order = last.order
            return reduced
        result = engine.run(batch, config)
        # Probes the forward pass never reached go last (NaN statistics).
        self.probe_order = result.order
        return self._reducer.unpack(result.outputs, result.reached, result.weight_paths)

    def _split(self) -> list[Batch]:
        """The probe batch's chunks of `probe_batch_size` (none: run it whole)."""
        total = batch_size(standardize(self._x))
        size = self.probe_batch_size
        if size is None or total is None or total <= size:
            return []  # one chunk: the batch itself
        self._mean_loss = chunks.averaged(self.model, self.loss)
        if self.weight_gradients:
            chunks.check_weights(self.model, self.loss, self._mean_loss)
        engine = get_engine(self.model)
        parts = [
            chunks.split(standardize(data), size, total)
            for data in (self._x, self._y, self._sample_weight)
        ]
        self._chunk_rows = [min(size, total - start) for start in range(0, total, size)]
        return [
            engine.prepare(x, y, sample_weight, self.loss)
            for x, y, sample_weight in zip(*parts, strict=True)
        ]

    def _record(
        self, kind: str, epoch: int | None, step: int, reduced: Reduced
    ) -> None:
        nan_values = dict.fromkeys(self.statistics, math.nan)
        statistics = {
            probe: {
                name: reduced.statistics.get(probe, nan_values)[name]
                for name in self.statistics
            }
            for probe in self.probe_order
        }
        self.events.append(
            {
                "kind": kind,
                "epoch": epoch,
                "step": int(step),
                "statistics": statistics,
                "histograms": reduced.histograms,
                "weight_grad_norms": reduced.weight_grad_norms,
            }
        )
        if self._writer is not None:
            self._writer.write(kind, step, reduced, self.statistics, self.probe_order)
        if self.weight_gradients:
            # First: non-finite weights are the cause of the probes' NaNs.
            variables = self.model.trainable_variables
            norms = reduced.weight_grad_norms
            missing = set(reduced.without_gradient)
            self._alerts.check_weights(
                self.model,
                self._where(kind, epoch, step),
                [
                    v.path
                    for v in variables
                    if v.path in norms
                    and v.path not in missing
                    and not math.isfinite(norms[v.path])
                ],
                nonfinite_variables(variables),
            )
        self._alerts.check(
            self.model,
            self._where(kind, epoch, step),
            self.probe_order,
            reduced.statistics,
        )

    # Alerts.

    def _where(self, kind: str, epoch: int | None, step: int) -> str:
        if kind == "epoch":
            return f"at epoch {epoch}"
        if kind == "start":
            return "before the first update"
        return f"at training step {step}"

    # In-memory results.

    def to_numpy(self, kind: str = "epoch") -> dict[str, np.ndarray]:
        """The recorded events of one kind as NumPy arrays.

        Args:
            kind: `"epoch"`, `"start"` or `"batch"`. Defaults to `"epoch"`.

        Returns:
            A dict with `"epoch"` (NaN for start events) and `"step"`, then
            one array per `actgrad/<probe>/<statistic>` key and per
            `actgrad_weights/<variable path>/grad_norm` key, one entry per
            event, in the order recorded.
        """
        return to_columns(self.events, kind, ("epoch", "start", "batch"))

    @property
    def history(self) -> dict[str, list[float]]:
        """Epoch events as plain lists, like `keras.callbacks.History.history`.

        Keys are `"epoch"` (the probed epoch indices) and every
        `actgrad/<probe>/<statistic>` (and weight-gradient) key.
        """
        return history(self.to_numpy("epoch"))
