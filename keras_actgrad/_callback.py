"""`ActivationGradientCallback`: per-probe gradient statistics while training."""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._engine import (
    LossSpec,
    PassConfig,
    ProbeEngine,
    describe,
    get_engine,
    standardize,
)
from keras_actgrad._probe import find_probes
from keras_actgrad._statistics import (
    DEFAULT_BINS,
    STATISTICS,
    Reduced,
    StatisticsReducer,
    check_statistics,
    log_key,
)

_ON_NONFINITE = ("warn", "raise", "stop")
FreqSpec = int | Sequence[int] | Callable[[int], bool]


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
            batches, of which the first batch is taken once, here.
        log_dir: String, the TensorBoard log directory (the one given to
            `keras.callbacks.TensorBoard`, if any). Summaries go to
            `<log_dir>/actgrad/`. `None` writes no summaries. Under a
            multi-worker `tf.distribute` strategy only the chief writes; the
            other workers compute the same statistics and `logs`. Defaults
            to `None`.
        freq: When to probe, by 0-based epoch index: an int `N` (epochs
            with `epoch % N == 0`), a list of epoch indices, or a callable
            `epoch -> bool`. Defaults to `1` (every epoch).
        loss: The loss whose gradient is measured: `"model"` (the compiled
            training loss), `"sum"`, a Keras loss name or a callable
            `loss(y_true, y_pred)`, as in `activation_gradients`. Defaults
            to `"model"`.
        statistics: Names of the statistics to compute and write to
            TensorBoard and `events` (see the README's statistics table), or
            `None` for all of them. Defaults to `None`.
        log_statistics: Statistics written to `logs` as
            `actgrad/<probe>/<statistic>`, a subset of `statistics`.
            Defaults to `("grad_norm",)`.
        histograms: Whether to compute histograms of each probe's gradient
            and activation (on the device, `histogram_bins` bins). Defaults
            to `True`.
        on_nonfinite: What to do when a probe's gradient has NaN or Inf
            entries: `"warn"` (once per run), `"raise"` (a
            `FloatingPointError`) or `"stop"` (warn and set
            `model.stop_training`). Defaults to `"warn"`.
        weight_gradients: Whether to also compute, from the same backward
            pass, the L2 norm of each trainable weight's gradient (written
            to TensorBoard as `actgrad_weights/<variable path>/grad_norm`
            and kept in `events`). Defaults to `False`.
        probe_at_start: Whether to record one event before the first
            update (TensorBoard prefix `actgrad_start/`). Defaults to
            `False`.
        batch_freq: Also probe every `batch_freq` training steps
            (TensorBoard prefix `actgrad_batch/`, step = global step; not
            in `logs`). `None` turns it off. Defaults to `None`.
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
        log_statistics: Sequence[str] = ("grad_norm",),
        histograms: bool = True,
        on_nonfinite: str = "warn",
        weight_gradients: bool = False,
        probe_at_start: bool = False,
        batch_freq: int | None = None,
        training: bool = False,
        histogram_bins: int = DEFAULT_BINS,
        vanishing_threshold: float = 1e-4,
        exploding_threshold: float = 1e4,
        profile_images: bool = False,
    ) -> None:
        super().__init__()
        self.freq = _check_freq(freq)
        if batch_freq is not None and not _is_positive_int(batch_freq):
            raise ValueError(
                "`batch_freq` must be a positive int (probe every N training "
                f"steps) or None (off). Received: batch_freq={batch_freq!r}."
            )
        self.batch_freq = batch_freq
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(
                f"Unknown `on_nonfinite`: {on_nonfinite!r}. Accepted values: "
                f"{list(_ON_NONFINITE)}. Received: on_nonfinite={on_nonfinite!r}."
            )
        self.on_nonfinite = on_nonfinite
        self.statistics = check_statistics(statistics, "statistics")
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
        if not (isinstance(loss, str) or callable(loss)):
            raise ValueError(
                "`loss` must be 'model', 'sum', a Keras loss name, or a callable "
                f"`loss(y_true, y_pred) -> scalar`. Received: loss={loss!r}."
            )
        self.loss = loss
        if not _is_positive_int(histogram_bins):
            raise ValueError(
                "`histogram_bins` must be a positive int. "
                f"Received: histogram_bins={histogram_bins!r}."
            )
        for name, value in (
            ("vanishing_threshold", vanishing_threshold),
            ("exploding_threshold", exploding_threshold),
        ):
            if (
                not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"`{name}` must be a positive finite number. "
                    f"Received: {name}={value!r}."
                )
        if vanishing_threshold >= exploding_threshold:
            raise ValueError(
                "`vanishing_threshold` must be smaller than `exploding_threshold`. "
                f"Received: vanishing_threshold={vanishing_threshold!r}, "
                f"exploding_threshold={exploding_threshold!r}."
            )
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(
                "`log_dir` must be a path (a string) or None. "
                f"Received: log_dir={log_dir!r}."
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
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
        self._x, self._y, self._sample_weight = _first_batch(probe_data)
        computed = set(self.statistics) | {"grad_norm", "nonfinite"}
        self._reducer = StatisticsReducer(
            statistics=tuple(name for name in STATISTICS if name in computed),
            bins=self.histogram_bins if self.histograms else 0,
        )
        self.events: list[dict[str, Any]] = []
        self.probe_order: list[str] = []
        self._engine: ProbeEngine | None = None
        self._writer: Any = None
        self._alerted: set[str] = set()
        self._step = 0
        self._epoch_start_step = 0
        self._epoch = 0
        self._device_data: tuple[Any, Any, Any] | None = None
        self._checked_model: keras.Model | None = None
        self._reached: list[str] = []
        if batch_freq is not None:
            self.on_train_batch_end = self._on_train_batch_end

    # Keras hooks.

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._alerted = set()
        self._engine = get_engine(self.model)
        self._step = _global_step(self.model)
        self._epoch_start_step = self._step
        if self._device_data is None:
            self._device_data = _to_device(self._x, self._y, self._sample_weight)
        # The checks: one probe pass before the first batch (once per model;
        # a later `fit` reuses the checked, compiled pass).
        reduced = None
        if self.probe_at_start or self._checked_model is not self.model:
            reduced = self._probe()
            self._checked_model = self.model
        if (
            self.log_dir is not None
            and self._writer is None
            and _writes_summaries(self.model)
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
        self._step = self._epoch_start_step + int(batch) + 1
        if (
            self.batch_freq
            and self._step // self.batch_freq > previous // self.batch_freq
        ):
            self._record("batch", self._epoch, self._step, self._probe())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            logs = {}
        reduced = None
        if self._scheduled(epoch):
            reduced = self._probe()
            self._record("epoch", epoch, epoch, reduced)
        for probe in self.probe_order:
            values = {} if reduced is None else reduced.statistics.get(probe, {})
            for statistic in self.log_statistics:
                logs[log_key(probe, statistic)] = values.get(statistic, math.nan)

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
        engine = self._engine
        if engine is None or self._device_data is None:
            raise RuntimeError(
                "ActivationGradientCallback probes only during `fit` (after "
                "`on_train_begin`). Pass it to `model.fit(callbacks=[...])`."
            )
        config = PassConfig(
            loss=self.loss,
            training=self.training,
            weight_gradients=self.weight_gradients,
            reducer=self._reducer,
        )
        x, y, sample_weight = self._device_data
        vector = engine.adapter.to_numpy(engine.run(x, y, sample_weight, config))
        weight_paths = (
            list(dict.fromkeys(v.path for v in self.model.trainable_variables))
            if self.weight_gradients
            else []
        )
        reduced = self._reducer.unpack(vector, engine.probe_order, weight_paths)
        if self._reached != engine.probe_order:
            # Probes the forward pass never reached go last (NaN statistics).
            self._reached = list(engine.probe_order)
            order = list(engine.probe_order)
            order += [p.name for p in find_probes(self.model) if p.name not in order]
            self.probe_order = order
        return reduced

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
        self._alert(kind, epoch, step, reduced)

    # Alerts.

    def _where(self, kind: str, epoch: int | None, step: int) -> str:
        if kind == "epoch":
            return f"at epoch {epoch}"
        if kind == "start":
            return "before the first update"
        return f"at training step {step}"

    def _alert(self, kind: str, epoch: int | None, step: int, reduced: Reduced) -> None:
        where = self._where(kind, epoch, step)
        model_name = self.model.name
        for probe in self.probe_order:
            count = reduced.statistics.get(probe, {}).get("nonfinite", math.nan)
            if not count > 0:
                continue
            message = (
                f"Non-finite gradients (NaN or Inf) {where} in model '{model_name}': "
                f"first in forward order at probe '{probe}' ({int(count)} "
                "entries of the probe batch's gradient). The loss or an "
                "activation overflowed or divided by zero; lower the learning "
                "rate, clip gradients, or check the inputs."
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message)
            if self.on_nonfinite == "stop":
                self.model.stop_training = True
                message += " Training stops (on_nonfinite='stop')."
            self._warn_once("nonfinite", message)
            break
        norms = [
            (probe, reduced.statistics[probe]["grad_norm"])
            for probe in self.probe_order
            if probe in reduced.statistics
            and math.isfinite(reduced.statistics[probe]["grad_norm"])
        ]
        if len(norms) < 2 or norms[-1][1] <= 0:
            return
        (first, first_norm), (last, last_norm) = norms[0], norms[-1]
        ratio = first_norm / last_norm
        if ratio < self.vanishing_threshold:
            self._warn_once(
                "vanishing",
                f"Vanishing gradient {where} in model '{model_name}': grad_norm at "
                f"the first probe '{first}' ({first_norm:.3g}) is {ratio:.3g} times "
                f"that at the last probe '{last}' ({last_norm:.3g}), below "
                f"vanishing_threshold={self.vanishing_threshold:g}. Consider ReLU-"
                "like activations, normalization, residual connections or a "
                "different initialization.",
            )
        elif ratio > self.exploding_threshold:
            self._warn_once(
                "exploding",
                f"Exploding gradient {where} in model '{model_name}': grad_norm at "
                f"the first probe '{first}' ({first_norm:.3g}) is {ratio:.3g} times "
                f"that at the last probe '{last}' ({last_norm:.3g}), above "
                f"exploding_threshold={self.exploding_threshold:g}. Consider "
                "normalization, gradient clipping or a smaller initialization.",
            )

    def _warn_once(self, alert: str, message: str) -> None:
        if alert in self._alerted:
            return
        self._alerted.add(alert)
        warnings.warn(message, stacklevel=4)

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
        if kind not in ("epoch", "start", "batch"):
            raise ValueError(
                f"`kind` must be 'epoch', 'start' or 'batch'. Received: kind={kind!r}."
            )
        events = [event for event in self.events if event["kind"] == kind]
        columns: dict[str, list[float]] = {
            "epoch": [math.nan if e["epoch"] is None else e["epoch"] for e in events],
            "step": [e["step"] for e in events],
        }
        keys: dict[str, None] = {}
        for event in events:
            for probe, values in event["statistics"].items():
                for name in values:
                    keys[log_key(probe, name)] = None
            for path in event["weight_grad_norms"]:
                keys[f"actgrad_weights/{path}/grad_norm"] = None
        for key in keys:
            columns[key] = []
        for event in events:
            for key in keys:
                columns[key].append(_lookup(event, key))
        return {
            key: np.asarray(values, dtype=np.int64 if key == "step" else np.float64)
            for key, values in columns.items()
        }

    @property
    def history(self) -> dict[str, list[float]]:
        """Epoch events as plain lists, like `keras.callbacks.History.history`.

        Keys are `"epoch"` (the probed epoch indices) and every
        `actgrad/<probe>/<statistic>` (and weight-gradient) key.
        """
        columns = self.to_numpy("epoch")
        history: dict[str, list[float]] = {
            "epoch": columns.pop("epoch").astype(int).tolist()
        }
        del columns["step"]
        history.update((key, values.tolist()) for key, values in columns.items())
        return history


def _lookup(event: dict[str, Any], key: str) -> float:
    if key.startswith("actgrad_weights/"):
        path = key[len("actgrad_weights/") : -len("/grad_norm")]
        return float(event["weight_grad_norms"].get(path, math.nan))
    probe, _, statistic = key[len("actgrad/") :].rpartition("/")
    return float(event["statistics"].get(probe, {}).get(statistic, math.nan))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and int(value) > 0


def _check_freq(freq: Any) -> FreqSpec:
    if _is_int(freq):
        if int(freq) > 0:
            return int(freq)
    elif callable(freq):
        return freq  # type: ignore[no-any-return]
    elif isinstance(freq, Iterable) and not isinstance(freq, (str, bytes, dict)):
        epochs = list(freq)
        if all(_is_int(e) and int(e) >= 0 for e in epochs):
            return frozenset(int(e) for e in epochs)  # type: ignore[return-value]
    raise ValueError(
        "`freq` must be a positive int N (probe at epochs with epoch % N == 0), "
        "a list of 0-based epoch indices (ints >= 0), or a callable "
        f"`epoch -> bool`. Received: freq={freq!r}."
    )


def _writes_summaries(model: keras.Model) -> bool:
    """False on the non-chief workers of a multi-worker `tf.distribute` run.

    Keras's TensorFlow trainer exposes the model's strategy; its
    `extended.should_save_summary` is False on every worker but the chief
    (`MultiWorkerMirroredStrategy`) and True otherwise.
    """
    strategy = getattr(model, "distribute_strategy", None)
    extended = getattr(strategy, "extended", None)
    try:
        return bool(getattr(extended, "should_save_summary", True))
    except NotImplementedError:
        return True


def _global_step(model: keras.Model) -> int:
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return 0
    try:
        return int(keras.ops.convert_to_numpy(iterations))
    except Exception:  # noqa: BLE001 - an optimizer not built yet
        return 0


def _is_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("tensorflow") and hasattr(
        data, "element_spec"
    )


def _first_batch(probe_data: Any) -> tuple[Any, Any, Any]:
    """Returns `(x, y, sample_weight)` of the probe batch, as NumPy."""
    source = "probe_data"
    batch = probe_data
    if isinstance(probe_data, keras.utils.PyDataset):
        if len(probe_data) == 0:
            raise ValueError(
                "`probe_data` is an empty `PyDataset`: it has no batch to take. "
                f"Received: probe_data={probe_data!r}."
            )
        batch = probe_data[0]
        source = "the first batch of `probe_data`"
    elif _is_dataset(probe_data) or (
        not isinstance(probe_data, (tuple, list, dict, str, bytes))
        and getattr(probe_data, "shape", None) is None
        and isinstance(probe_data, Iterable)
    ):
        try:
            batch = next(iter(probe_data))
        except StopIteration:
            raise ValueError(
                "`probe_data` is an empty dataset or generator: it has no batch "
                f"to take. Received: probe_data={probe_data!r}."
            ) from None
        source = "the first batch of `probe_data`"
    if batch is None or isinstance(batch, (str, bytes, numbers.Number)):
        raise ValueError(
            "`probe_data` must be `(x, y)`, `(x, y, sample_weight)`, `x` alone "
            "(an array, a list or a dict of arrays), or a `tf.data.Dataset`, "
            "`keras.utils.PyDataset` or generator yielding such batches. "
            f"Received: probe_data={probe_data!r}."
        )
    if isinstance(batch, tuple):
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                f"{source} is a tuple of {len(batch)} elements; expected `(x,)`, "
                "`(x, y)` or `(x, y, sample_weight)`. Pass multiple inputs as a "
                f"list or dict inside `x`. Received: {describe(batch)}."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    else:
        x, y, sample_weight = batch, None, None
    to_numpy = _numpy_leaves
    return to_numpy(x), to_numpy(y), to_numpy(sample_weight)


def _numpy_leaves(data: Any) -> Any:
    if data is None:
        return None

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) or leaf is None:
            return leaf
        if hasattr(leaf, "numpy") or hasattr(leaf, "__array__"):
            return keras.ops.convert_to_numpy(leaf)
        return leaf

    return keras.tree.map_structure(convert, data)


def _to_device(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
    """Moves the probe batch to the device once (numeric arrays only)."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biuf":
            return keras.ops.convert_to_tensor(leaf)
        return leaf

    def move(data: Any) -> Any:
        return (
            None
            if data is None
            else keras.tree.map_structure(convert, standardize(data))
        )

    return move(x), move(y), move(sample_weight)
