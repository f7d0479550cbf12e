"""Reading the callback's event files back: the report's table and heatmap.

`ActivationGradientCallback(log_dir=...)` writes its events into
`<log_dir>/actgrad/`: one scalar per probe and statistic at every probed
epoch (tag `actgrad.<statistic>/<probe>`, step = 0-based epoch; the tags of
development versions before 0.1.0, `actgrad/<probe>/<statistic>`, are read
too), and the
probes' forward order as the text summary `actgrad/probe_order`.
`GradientMonitor(log_dir=...)` writes its step events there too, every
value of a step packed in one tensor (see `_tensorboard.py`); a log directory
without epoch events is reported by step. This module reads them
(`_eventfile`: without TensorFlow or Keras, so that the report starts fast)
and turns them into a table (the `keras-actgrad report` command) and a
probes x epochs (or steps) heatmap.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import html
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from keras_actgrad._eventfile import EventFile, event_files, read_file, table
from keras_actgrad._plots import number, plot_heatmap
from keras_actgrad._tags import (
    DEAD_UNIT_FRACTION,
    EVENTS_SUBDIR,
    EXPLODING_RATIO,
    LOG_PREFIX,
    PROBE_ORDER_TAG,
    THRESHOLDS_TAG,
    VANISHING_RATIO,
    parse_key,
    parse_summary_tag,
)

__all__ = [
    "DEAD_UNIT_FRACTION",
    "EXPLODING_RATIO",
    "VANISHING_RATIO",
    "Report",
    "load_report",
]


@dataclasses.dataclass(frozen=True)
class Report:
    """The per-probe statistics a run's `ActivationGradientCallback` logged.

    Attributes:
        log_dir: The directory the events were read from.
        probes: Probe names in forward order (input side first).
        epochs: The probed epochs (0-based, as Keras counts them), sorted.
        values: `values[statistic][probe][epoch]`, the logged value.
        start: `start[statistic][probe]`, the `probe_at_start` values (empty
            when the callback did not probe before training).
        thresholds: The callback's alert thresholds, `{"vanishing": ...,
            "exploding": ...}`, as stored in the events (empty for logs
            written before they were stored). `alerts` and `table` use them
            unless given others.
        all_probes: Every probe of the run in forward order, when `probes`
            is a selection (`select`); the vanishing / exploding alerts
            still compare with the run's last probe. Empty: `probes`.
        kind: `"epoch"` (the callback's epoch events) or `"step"` (the
            `GradientMonitor`'s step events: `epochs` then holds global
            steps).

    In a notebook a `Report` shows itself: the heatmap and the table
    (`_repr_html_`; `_repr_png_` is the heatmap alone).
    """

    log_dir: str
    probes: list[str]
    epochs: list[int]
    values: dict[str, dict[str, dict[int, float]]]
    start: dict[str, dict[str, float]]
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    all_probes: list[str] = dataclasses.field(default_factory=list)
    kind: str = "epoch"

    def select(self, patterns: str | Sequence[str]) -> Report:
        """The report restricted to the probes matching any glob pattern.

        Patterns are shell globs on the probe names (`fnmatch`, case
        sensitive): `"transformer_layer_1*"`, `"*/self_attention/*"`,
        `"dense_probe"`. The alerts keep comparing with the run's last probe.

        Raises:
            ValueError: if no probe matches.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        chosen = [
            probe
            for probe in self.probes
            if any(fnmatch.fnmatchcase(probe, pattern) for pattern in patterns)
        ]
        if not chosen:
            raise ValueError(
                f"No probe matches {list(patterns)}. Patterns are globs on the "
                f"probe names, e.g. '{self.probes[0]}*'; the run's probes are "
                f"{_some(self.probes)}. Received: patterns={list(patterns)!r}."
            )
        return dataclasses.replace(
            self, probes=chosen, all_probes=self.all_probes or list(self.probes)
        )

    def threshold(self, kind: str, given: float | None = None) -> float:
        """`given`, else the run's stored `kind` threshold, else the default."""
        if given is not None:
            return float(given)
        default = {"vanishing": VANISHING_RATIO, "exploding": EXPLODING_RATIO}[kind]
        return float(self.thresholds.get(kind, default))

    @property
    def statistics(self) -> list[str]:
        """The statistics present in the events, sorted."""
        return sorted(self.values)

    def matrix(self, statistic: str = "grad_norm") -> np.ndarray:
        """A `(len(probes), len(epochs))` float array; NaN where not logged."""
        self._statistic(statistic)
        return self._logged_matrix(statistic, self.probes)[0]

    def _logged_matrix(
        self, statistic: str, probes: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(values, logged)`, `(len(probes), len(epochs))` arrays: NaN and
        False where `statistic` was not logged (also when it never was)."""
        per_probe = self.values.get(statistic, {})
        values = np.full((len(probes), len(self.epochs)), np.nan)
        logged = np.zeros(values.shape, bool)
        for i, probe in enumerate(probes):
            series = per_probe.get(probe, {})
            if isinstance(series, _Series) and series.steps is self.epochs:
                values[i] = series.row
                logged[i] = True if series.present is None else series.present
                continue
            for j, epoch in enumerate(self.epochs):
                value = series.get(epoch)
                if value is not None:
                    values[i, j] = value
                    logged[i, j] = True
        return values, logged

    def alerts(
        self,
        vanishing: float | None = None,
        exploding: float | None = None,
        dead_units: float = DEAD_UNIT_FRACTION,
    ) -> dict[str, list[str]]:
        """Alerts per probe (in forward order), each a short phrase.

        - `no gradient`: the probe does not reach the loss (its gradient
          statistics are logged as NaN).
        - `non-finite`: a NaN or Inf gradient entry (the `nonfinite` count
          is positive, or, without that count, `grad_norm` is not finite).
        - `vanishing`: `grad_norm` below `vanishing` times the `grad_norm`
          of the last probe (nearest the loss; the last one with a finite
          `grad_norm`) at the same epoch.
        - `exploding`: `grad_norm` above `exploding` times the last probe's.
        - `dead units`: `dead_unit_fraction >= dead_units`.

        `vanishing` and `exploding` default to the thresholds the callback
        stored in the events (see `thresholds`), else to 1e-4 and 1e4.
        Each alert names the first epoch where it holds.
        """
        vanishing = self.threshold("vanishing", vanishing)
        exploding = self.threshold("exploding", exploding)
        everyone = list(self.all_probes or self.probes)
        rows = [everyone.index(probe) for probe in self.probes]
        norms, logged = self._logged_matrix("grad_norm", everyone)
        # Per epoch, the `grad_norm` of the last probe that has a finite one
        # (as the callback does, probes without a gradient are left out).
        finite = np.isfinite(norms)
        last = len(everyone) - 1 - np.argmax(finite[::-1], axis=0)
        columns = np.arange(len(self.epochs))
        reference = np.where(
            finite.any(axis=0), norms[last, columns] if everyone else np.nan, np.nan
        )
        norms, logged = norms[rows], logged[rows]
        with np.errstate(all="ignore"):
            ratio = np.where(reference > 0, norms / reference, np.nan)
        counts, counted = self._logged_matrix("nonfinite", self.probes)
        # `nonfinite` not logged: judge by the norm.
        counts = np.where(
            counted, counts, np.where(logged & ~np.isfinite(norms), 1.0, 0.0)
        )
        dead, dead_logged = self._logged_matrix("dead_unit_fraction", self.probes)
        dead = np.where(dead_logged, dead, 0.0)
        with np.errstate(invalid="ignore"):
            conditions = {
                # The callback logs NaN for every gradient statistic of a
                # probe that has no gradient (not connected to the loss).
                "no gradient": logged & np.isnan(counts),
                "non-finite": counts > 0,
                "vanishing": ratio < vanishing,
                "exploding": ~(ratio < vanishing) & (ratio > exploding),
                "dead units": dead >= dead_units,
            }
        unit = self.kind
        out: dict[str, list[str]] = {}
        for i, probe in enumerate(self.probes):
            found = []
            for order, (name, holds) in enumerate(conditions.items()):
                if holds[i].any():
                    found.append((int(np.argmax(holds[i])), order, name))
            out[probe] = [
                f"{name} ({unit} {self.epochs[j]})" for j, _, name in sorted(found)
            ]
        return out

    def table(
        self,
        statistic: str = "grad_norm",
        vanishing: float | None = None,
        exploding: float | None = None,
        dead_units: float = DEAD_UNIT_FRACTION,
    ) -> str:
        """The report as a text table: one row per probe, in forward order.

        Columns: the probe, `statistic` at the `probe_at_start` event (when
        there is one), at the first and at the last probed epoch, the trend
        (last / first, with an arrow), and the alerts (see `alerts`).
        """
        per_probe = self._statistic(statistic)
        first_epoch, last_epoch = self.epochs[0], self.epochs[-1]
        alerts = self.alerts(vanishing, exploding, dead_units)
        starts = self.start.get(statistic, {})
        header = ["probe"]
        if starts:
            header.append("start")
        unit = self.kind
        header += [f"{unit} {first_epoch}", f"{unit} {last_epoch}", "trend", "alerts"]
        rows = [header]
        for probe in self.probes:
            series = per_probe.get(probe, {})
            first = series.get(first_epoch, math.nan)
            last = series.get(last_epoch, math.nan)
            row = [probe]
            if starts:
                row.append(number(starts.get(probe, math.nan)))
            row += [
                number(first),
                number(last),
                _trend(first, last),
                ", ".join(alerts[probe]) or "-",
            ]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        numeric = range(1, len(header) - 1)
        lines = []
        for row in rows:
            cells = [
                cell.rjust(width) if i in numeric else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * width for width in widths))
        title = (
            f"{statistic} per probe (forward order), {unit}s {first_epoch}-"
            f"{last_epoch}, {len(self.epochs)} probed; log dir: {self.log_dir}"
        )
        return "\n".join([title, *lines])

    def plot(
        self,
        path: str,
        statistic: str = "grad_norm",
        vanishing: float | None = None,
        exploding: float | None = None,
        dead_units: float = DEAD_UNIT_FRACTION,
    ) -> None:
        """Saves a probes x epochs heatmap of `statistic` (log colour) as PNG.

        The alerts marked on it use the thresholds as `alerts` does.
        """
        plot_heatmap(self, path, statistic, vanishing, exploding, dead_units)

    def _repr_png_(self) -> bytes | None:
        """The `grad_norm` heatmap as PNG (None without matplotlib)."""
        if "grad_norm" not in self.values:
            return None
        buffer = io.BytesIO()
        try:
            plot_heatmap(self, buffer)
        except ImportError:
            return None
        return buffer.getvalue()

    def _repr_html_(self) -> str:
        """The heatmap (when matplotlib is there) and the table, for notebooks."""
        statistic = "grad_norm" if "grad_norm" in self.values else self.statistics[0]
        parts = [
            f"<p><b>keras-actgrad report</b>: {len(self.probes)} probes, "
            f"{len(self.epochs)} probed {self.kind}s; {html.escape(self.log_dir)}</p>"
        ]
        png = self._repr_png_()
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{data}"/>')
        table = html.escape(self.table(statistic))
        rows = len(self.probes)
        if rows > 30:  # a long table folds under the heatmap
            summary = f"<summary>table ({rows} probes)</summary>"
            parts.append(f"<details>{summary}<pre>{table}</pre></details>")
        else:
            parts.append(f"<pre>{table}</pre>")
        return "\n".join(parts)

    def _statistic(self, statistic: str) -> dict[str, dict[int, float]]:
        if statistic not in self.values:
            raise ValueError(
                f"The events in '{self.log_dir}' have no statistic "
                f"'{statistic}'. Pass one of the logged statistics "
                f"{self.statistics}. Received: statistic='{statistic}'."
            )
        return self.values[statistic]


def _some(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        return f"[{shown}, ... ({len(names)} in all)]"
    return f"[{shown}]"


def _trend(first: float, last: float) -> str:
    if not (math.isfinite(first) and math.isfinite(last)):
        return "?"
    if first == 0:
        return "\u2192 x1" if last == 0 else "\u2191 from 0"
    ratio = last / first
    arrow = "\u2192" if 0.9 <= ratio <= 1.1 else ("\u2191" if ratio > 1 else "\u2193")
    return f"{arrow} x{ratio:.3g}"


def _events_dir(log_dir: str) -> str:
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(
            f"Log directory '{log_dir}' does not exist. Pass the `log_dir` given "
            f"to `ActivationGradientCallback`. Received: log_dir='{log_dir}'."
        )
    sub = os.path.join(log_dir, EVENTS_SUBDIR)
    if os.path.isdir(sub):
        return sub
    return log_dir  # the `actgrad/` directory itself


def _is_probe_column(name: str) -> bool:
    """Whether a packed column is a probe's statistic (`actgrad/<probe>/<name>`)."""
    parsed = parse_key(name)
    return parsed is not None and parsed[0] == LOG_PREFIX


def _read_event_file(
    path: str,
) -> tuple[dict[str, dict[int, float]], list[str], dict[str, float], EventFile]:
    """`({scalar tag: {step: value}}, probe order, thresholds, the file)`."""
    file = read_file(path, keep=_is_probe_column)
    order = file.texts.get(PROBE_ORDER_TAG) or []
    stored = file.texts.get(THRESHOLDS_TAG) or {}
    thresholds = {str(k): float(v) for k, v in stored.items()}
    return file.scalars, list(order), thresholds, file


class _Series(Mapping[int, float]):
    """One probe's statistic by step: a row of the run's packed step table.

    `steps` is the report's `epochs` list (shared), `row` the values,
    `present` where the statistic was logged (None: at every step).
    """

    def __init__(
        self,
        steps: list[int],
        index: dict[int, int],
        row: np.ndarray,
        present: np.ndarray | None,
    ) -> None:
        self.steps, self.row, self.present = steps, row, present
        self._index = index

    def __getitem__(self, step: int) -> float:
        j = self._index[step]
        if self.present is not None and not self.present[j]:
            raise KeyError(step)
        return float(self.row[j])

    def __iter__(self) -> Iterator[int]:
        if self.present is None:
            return iter(self.steps)
        return (
            step for step, here in zip(self.steps, self.present, strict=True) if here
        )

    def __len__(self) -> int:
        return len(self.steps) if self.present is None else int(self.present.sum())

    def __repr__(self) -> str:
        return f"<{len(self)} values, steps {self.steps[0]}-{self.steps[-1]}>"


def _step_values(
    files: list[EventFile],
) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """The monitor's packed step events: `(steps, values[statistic][probe])`.

    A step logged twice (a later `fit` restarting at an earlier step) keeps
    its latest value.
    """
    steps, columns, present = table(files)
    if not steps.size:
        return [], {}
    reversed_steps = steps[::-1]
    unique, first = np.unique(reversed_steps, return_index=True)
    chosen = len(steps) - 1 - first
    if len(unique) == len(steps) and np.all(chosen == np.arange(len(steps))):
        chosen = None  # already sorted and unique: no copies
    kept = unique.tolist()
    index = {step: j for j, step in enumerate(kept)}
    values: dict[str, dict[str, Any]] = {}
    for name, row in columns.items():
        parsed = parse_key(name)
        if parsed is None:
            continue
        _, probe, statistic = parsed
        mask = present.get(name)
        if chosen is not None:
            row = row[chosen]
            mask = None if mask is None else mask[chosen]
        values.setdefault(statistic, {})[probe] = _Series(kept, index, row, mask)
    return kept, values


def _kind(tag: str) -> str | None:
    """The event kind of one of the callback's probe tags, else None."""
    parsed = parse_summary_tag(tag)
    return parsed.kind if parsed is not None and parsed.target == "probe" else None


def load_report(log_dir: str, kind: str | None = None) -> Report:
    """Reads what `ActivationGradientCallback(log_dir=...)` logged.

    Reads the event files in `<log_dir>/actgrad/` (or in `log_dir` itself,
    if it is that directory), without TensorFlow or Keras. The callback's
    epoch events are reported by epoch; the step events of a
    `GradientMonitor(log_dir=...)` by global step (`kind="step"`, the
    default when there are no epoch events). Each `fit` writes its own
    event file; when a later `fit` starts again at an epoch already logged
    (a new training run in the same `log_dir`), its events replace the
    earlier run's from that epoch on, as TensorBoard does; a `fit` that
    continues with `initial_epoch` adds its epochs.

    Args:
        log_dir: The callback's (or the monitor's) `log_dir`.
        kind: `"epoch"`, `"step"`, or `None`: epoch events when there are
            any, else step events. Defaults to `None`.

    Returns:
        A `Report`. `print(report.table())` prints the per-probe table,
        `report.plot("report.png")` saves the heatmap.

    Raises:
        FileNotFoundError: if `log_dir` does not exist.
        ValueError: if it holds no keras-actgrad epoch events.

    Example:

    ```python
    report = keras_actgrad.load_report("logs/run1")
    print(report.table())
    ```
    """
    if kind not in (None, "epoch", "step"):
        raise ValueError(
            "`kind` must be 'epoch' (the callback's epoch events), 'step' (the "
            f"monitor's step events) or None (either). Received: kind={kind!r}."
        )
    path = _events_dir(log_dir)
    if not event_files(path):
        raise ValueError(
            f"No keras-actgrad events in '{log_dir}': expected TensorBoard event "
            f"files in '{os.path.join(log_dir, EVENTS_SUBDIR)}', written by "
            "`ActivationGradientCallback(log_dir=...)` during `fit`. "
            f"Received: log_dir='{log_dir}' with contents "
            f"{sorted(os.listdir(log_dir))[:10]}."
        )
    # One event file per `fit`. A run whose epochs restart at or before the
    # last epoch already read replaces the earlier runs' epochs from there on
    # (TensorBoard's "purge orphaned data"); a run continued with
    # `initial_epoch` adds its epochs.
    scalars: dict[str, dict[int, float]] = {}
    order: list[str] = []
    thresholds: dict[str, float] = {}
    read: list[EventFile] = []
    for file in event_files(path):
        file_scalars, file_order, file_thresholds, contents = _read_event_file(file)
        read.append(contents)
        steps = [
            step
            for tag, series in file_scalars.items()
            if _kind(tag) == "epoch"
            for step in series
        ]
        if steps:
            first = min(steps)
            for tag, series in scalars.items():
                if _kind(tag) == "epoch":
                    scalars[tag] = {k: v for k, v in series.items() if k < first}
        for tag, series in file_scalars.items():
            if _kind(tag) == "start":
                scalars[tag] = series  # the latest run's start event
            else:
                scalars.setdefault(tag, {}).update(series)
        order = file_order or order
        thresholds = file_thresholds or thresholds
    if kind != "epoch" and not any(
        _kind(tag) == "epoch" for tag, series in scalars.items() if series
    ):
        steps, step_values = _step_values(read)
        if step_values or kind == "step":
            if not step_values:
                raise ValueError(
                    f"No keras-actgrad step events in '{log_dir}': they are "
                    "written by `GradientMonitor(log_dir=...)`. Received: "
                    f"log_dir='{log_dir}', kind='step'."
                )
            logged = set(step_values.get("grad_norm", {}))
            logged |= {p for per_probe in step_values.values() for p in per_probe}
            probes = [probe for probe in order if probe in logged]
            probes += sorted(logged - set(probes))
            return Report(
                log_dir, probes, steps, step_values, {}, thresholds, kind="step"
            )
    if kind == "epoch" and any(contents.steps for contents in read):
        if not any(_kind(tag) == "epoch" for tag, series in scalars.items() if series):
            raise ValueError(
                f"No keras-actgrad epoch events in '{log_dir}': it holds the step "
                "events of a `GradientMonitor`. Pass kind='step' (or None). "
                f"Received: log_dir='{log_dir}', kind='epoch'."
            )
    if not any(parse_summary_tag(tag) for tag in scalars):
        raise ValueError(
            f"No keras-actgrad events in '{log_dir}': the event files in '{path}' "
            "hold no `actgrad/...` scalars. Point the report at the `log_dir` "
            "given to `ActivationGradientCallback`. "
            f"Received: log_dir='{log_dir}' with tags {sorted(scalars)[:10]}."
        )
    values: dict[str, dict[str, dict[int, float]]] = {}
    start: dict[str, dict[str, float]] = {}
    for tag, series in scalars.items():
        parsed = parse_summary_tag(tag)
        if parsed is None or parsed.target != "probe" or not series:
            continue
        probe, statistic = parsed.key, parsed.name
        if parsed.kind == "epoch":
            values.setdefault(statistic, {})[probe] = dict(sorted(series.items()))
        elif parsed.kind == "start":
            start.setdefault(statistic, {})[probe] = series[max(series)]
    if not values:
        raise ValueError(
            f"No keras-actgrad epoch events in '{log_dir}': only "
            f"{sorted({tag.split('/')[0] for tag in scalars})} tags. The report "
            "shows epoch events; probe at least one epoch (`freq`). "
            f"Received: log_dir='{log_dir}'."
        )
    logged = {probe for per_probe in values.values() for probe in per_probe}
    probes = [probe for probe in order if probe in logged]
    probes += sorted(logged - set(probes))
    epochs = sorted(
        {e for per_probe in values.values() for s in per_probe.values() for e in s}
    )
    return Report(log_dir, probes, epochs, values, start, thresholds)
