"""Reading the callback's event files back: the report's table and heatmap.

`ActivationGradientCallback(log_dir=...)` writes its events into
`<log_dir>/actgrad/`: one scalar per probe and statistic at every probed
epoch (tag `actgrad.<statistic>/<probe>`, step = 0-based epoch; the tags of
development versions before 0.1.0, `actgrad/<probe>/<statistic>`, are read
too), and the
probes' forward order as the text summary `actgrad/probe_order`. This module
reads them with TensorBoard's own reader and turns them into a table (the
`keras-actgrad report` command) and a probes x epochs heatmap.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import html
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from keras_actgrad import _alerts
from keras_actgrad._plots import number, plot_heatmap
from keras_actgrad._tags import (
    DEAD_UNIT_FRACTION,
    EVENTS_SUBDIR,
    EXPLODING_RATIO,
    PROBE_ORDER_TAG,
    THRESHOLDS_TAG,
    VANISHING_RATIO,
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
        per_probe = self._statistic(statistic)
        out = np.full((len(self.probes), len(self.epochs)), np.nan)
        for i, probe in enumerate(self.probes):
            for j, epoch in enumerate(self.epochs):
                out[i, j] = per_probe.get(probe, {}).get(epoch, np.nan)
        return out

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
        norms = self.values.get("grad_norm", {})
        counts = self.values.get("nonfinite", {})
        dead = self.values.get("dead_unit_fraction", {})
        # Per epoch, the `grad_norm` of the last probe that has a finite one
        # (as the callback does, probes without a gradient are left out).
        everyone = self.all_probes or self.probes
        reference = {
            epoch: _alerts.reference_norm(
                [norms.get(probe, {}).get(epoch, math.nan) for probe in everyone]
            )
            for epoch in self.epochs
        }
        out: dict[str, list[str]] = {}
        for probe in self.probes:
            first: dict[str, int] = {}
            for epoch in self.epochs:
                norm = norms.get(probe, {}).get(epoch, math.nan)
                ref = reference.get(epoch, math.nan)
                ratio = norm / ref if ref > 0 else math.nan
                count = counts.get(probe, {}).get(epoch)
                logged = epoch in norms.get(probe, {})
                if count is None:  # `nonfinite` not logged: judge by the norm
                    count = 1.0 if logged and not math.isfinite(norm) else 0.0
                ratio_alert = _alerts.ratio_alert(ratio, vanishing, exploding)
                conditions = {
                    # The callback logs NaN for every gradient statistic of a
                    # probe that has no gradient (not connected to the loss).
                    "no gradient": logged and math.isnan(count),
                    "non-finite": _alerts.nonfinite(count),
                    "vanishing": ratio_alert == "vanishing",
                    "exploding": ratio_alert == "exploding",
                    "dead units": _alerts.dead_units(
                        dead.get(probe, {}).get(epoch, 0.0), dead_units
                    ),
                }
                for name, holds in conditions.items():
                    if holds:
                        first.setdefault(name, epoch)
            out[probe] = [f"{name} (epoch {epoch})" for name, epoch in first.items()]
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
        header += [f"epoch {first_epoch}", f"epoch {last_epoch}", "trend", "alerts"]
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
            f"{statistic} per probe (forward order), epochs {first_epoch}-"
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
            f"{len(self.epochs)} probed epochs; {html.escape(self.log_dir)}</p>"
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


def _event_files(path: str) -> list[str]:
    """The event files in `path`, oldest first (their names start with the
    creation time, as TensorBoard's writers and the callback's name them)."""
    return sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if "tfevents" in name and os.path.isfile(os.path.join(path, name))
    )


def _read_event_file(
    path: str,
) -> tuple[dict[str, dict[int, float]], list[str], dict[str, float]]:
    """`({scalar tag: {step: value}}, probe order, thresholds)` of one file."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(
        path,
        size_guidance={
            event_accumulator.SCALARS: 0,
            event_accumulator.TENSORS: 0,
            event_accumulator.HISTOGRAMS: 1,
            event_accumulator.IMAGES: 1,
            event_accumulator.COMPRESSED_HISTOGRAMS: 1,
            event_accumulator.AUDIO: 1,
        },
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars: dict[str, dict[int, float]] = {}
    for tag in tags.get("scalars", []):  # TF1-style summaries
        scalars[tag] = {e.step: float(e.value) for e in accumulator.Scalars(tag)}
    order: list[str] = []
    thresholds: dict[str, float] = {}
    for tag in tags.get("tensors", []):
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        events = accumulator.Tensors(tag)
        if tag in (PROBE_ORDER_TAG, THRESHOLDS_TAG) and events:
            raw = tensor_util.make_ndarray(events[-1].tensor_proto).item()
            text = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            if tag == PROBE_ORDER_TAG:
                order = text
            else:
                thresholds = {str(k): float(v) for k, v in text.items()}
        elif plugin == "scalars":
            scalars[tag] = {
                e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events
            }
    return scalars, order, thresholds


def _kind(tag: str) -> str | None:
    """The event kind of one of the callback's probe tags, else None."""
    parsed = parse_summary_tag(tag)
    return parsed.kind if parsed is not None and parsed.target == "probe" else None


def load_report(log_dir: str) -> Report:
    """Reads what `ActivationGradientCallback(log_dir=...)` logged.

    Uses TensorBoard's own event reader on `<log_dir>/actgrad/` (or on
    `log_dir` itself, if it is that directory). Each `fit` writes its own
    event file; when a later `fit` starts again at an epoch already logged
    (a new training run in the same `log_dir`), its events replace the
    earlier run's from that epoch on, as TensorBoard does; a `fit` that
    continues with `initial_epoch` adds its epochs.

    Args:
        log_dir: The callback's `log_dir`.

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
    path = _events_dir(log_dir)
    if not _event_files(path):
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
    for file in _event_files(path):
        file_scalars, file_order, file_thresholds = _read_event_file(file)
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
