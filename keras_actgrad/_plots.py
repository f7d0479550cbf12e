"""Drawings with matplotlib: the probes x epochs heatmap and the profile bars.

Used by the report (`Report.plot`, `keras-actgrad report --png`) and by the
TensorBoard writer (`profile_images=True`). matplotlib is imported when a
drawing is made, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from keras_actgrad._tags import DEAD_UNIT_FRACTION, VANISHING_RATIO, block_of

# Past this many probes the heatmap's rows are thin: labelled by block (the
# first component of the probe names) or every k-th, alerts marked at the
# right edge, and the figure's height capped.
MANY_PROBES = 48
MAX_HEIGHT = 22.0  # inches


def number(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def plot_heatmap(
    report: Any,
    path: str | IO[bytes],
    statistic: str = "grad_norm",
    vanishing: float | None = None,
    exploding: float | None = None,
    dead_units: float = DEAD_UNIT_FRACTION,
) -> None:
    """Saves `report`'s probes x epochs heatmap of `statistic` to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colors, figure, ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    data = report.matrix(statistic)
    alerts = report.alerts(vanishing, exploding, dead_units)
    n_probes, n_epochs = data.shape
    positive = data[np.isfinite(data) & (data > 0)]
    labels_inches = 0.08 * max((len(p) + 14 for p in report.probes), default=10)
    if n_probes <= MANY_PROBES:
        height = 1.6 + 0.42 * n_probes
    else:
        height = min(MAX_HEIGHT, 1.6 + 0.11 * n_probes)
        labels_inches = 0.08 * max(len(block_of(p)) + 6 for p in report.probes)
        labels_inches = min(labels_inches, 4.0)
    fig = figure.Figure(
        figsize=(min(18.0, labels_inches + 2.2 + 0.55 * max(n_epochs, 6)), height),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    norm = None
    low = high = 1.0
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        if high <= low * 1.0001:
            low, high = low / 2, high * 2
        norm = colors.LogNorm(vmin=low, vmax=high)
    shown = np.ma.masked_where(~(np.isfinite(data) & (data > 0)), data)
    image = ax.imshow(
        shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest"
    )
    every = math.ceil(n_epochs / 20) if n_epochs > 20 else 1
    ticks = range(0, n_epochs, every)
    ax.set_xticks(ticks, [str(report.epochs[k]) for k in ticks])
    _label_rows(ax, report.probes, alerts, n_epochs, height)
    unit = getattr(report, "kind", "epoch")
    ax.set_xlabel(unit)
    ax.set_title(f"{statistic} per probe and {unit}", loc="left")
    if norm is not None:
        bar = fig.colorbar(image, ax=ax, pad=0.02, aspect=max(20.0, 8 * height))
        bar.set_label(f"{statistic} (log scale)")
        plain = ticker.FuncFormatter(lambda value, _: number(value, digits=2))
        bar.ax.yaxis.set_major_formatter(plain)
        if high / low < 30:  # under ~1.5 decades: label the minor ticks too
            bar.ax.yaxis.set_minor_formatter(plain)
        else:
            bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if n_probes * n_epochs <= 300 and n_epochs <= 24:
        for i in range(n_probes):
            for j in range(n_epochs):
                value = data[i, j]
                if math.isnan(value) and not _logged(report, statistic, i, j):
                    continue
                text = number(value, digits=2)
                dark = (
                    norm is not None
                    and np.isfinite(value)
                    and value > 0
                    and (norm(value) < 0.6)
                )
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    fig.savefig(path)


def _label_rows(
    ax: Any,
    probes: Sequence[str],
    alerts: dict[str, list[str]],
    n_epochs: int,
    height: float,
) -> None:
    """Labels the heatmap's rows: every probe, or past `MANY_PROBES` one
    label per block (when the names have blocks) or every k-th probe, with
    the alerted probes marked by red triangles at the right edge."""
    red = "#c0392b"
    n = len(probes)
    if n <= MANY_PROBES:
        labels = [
            f"{p}  [{', '.join(a.split(' (')[0] for a in alerts[p])}]"
            if alerts[p]
            else p
            for p in probes
        ]
        ax.set_yticks(range(n), labels)
        for probe, label in zip(probes, ax.get_yticklabels(), strict=True):
            if alerts[probe]:
                label.set_color(red)
        ax.set_ylabel("probe (forward order, input at top)")
        return
    blocks: dict[str, list[int]] = {}
    for i, probe in enumerate(probes):
        blocks.setdefault(block_of(probe), []).append(i)
    room = max(4, int((height - 1.6) * 72 / 10))  # labels 10 points apart
    if 1 < len(blocks) < n and len(blocks) <= room:
        starts = [rows[0] for rows in blocks.values()]
        names = [f"{name} ({len(rows)})" for name, rows in blocks.items()]
        ax.set_yticks(starts, names, fontsize=8)
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=0.6)
        ax.set_ylabel("block (its probes), forward order, input at top")
    else:
        every = math.ceil(n / room)
        ticks = list(range(0, n, every))
        ax.set_yticks(ticks, [probes[i] for i in ticks], fontsize=8)
        ax.set_ylabel(f"probe (every {every}th named), forward order")
    flagged = [i for i, probe in enumerate(probes) if alerts[probe]]
    if flagged:
        ax.plot(
            [n_epochs - 0.5] * len(flagged),
            flagged,
            linestyle="none",
            marker="<",
            markersize=4,
            color=red,
            clip_on=False,
            label=f"probe with an alert ({len(flagged)})",
        )
        ax.legend(
            loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False
        )


def _logged(report: Any, statistic: str, i: int, j: int) -> bool:
    probe, epoch = report.probes[i], report.epochs[j]
    return epoch in report.values[statistic].get(probe, {})


def profile_png(
    probes: Sequence[str],
    grad_norms: Sequence[float],
    title: str,
    vanishing: float | None = None,
) -> tuple[bytes, int, int]:
    """A bar chart of `grad_norms` per probe (log scale), PNG-encoded.

    Probes in forward order, left to right; zero or non-finite values are
    drawn as short red bars labelled with their value. When a probe falls
    within 10x of the vanishing threshold (`vanishing`, by default
    `VANISHING_RATIO`, times the last probe's `grad_norm`), the threshold is
    drawn as a dashed line. Used for
    TensorBoard's Images tab (`profile_images=True` in the callback).

    Returns:
        `(png_bytes, width, height)`.
    """
    import io

    from matplotlib import figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ratio = VANISHING_RATIO if vanishing is None else vanishing
    values = np.asarray(grad_norms, dtype=float)
    # Fixed margins (a constrained layout costs several times the drawing):
    # room below the axes for the 45-degree probe names.
    labels_inches = (max((len(p) for p in probes), default=4) * 3.0 + 12) / 72
    width = max(4.0, 1.4 + 0.4 * len(probes))
    height = 2.4 + labels_inches
    fig = figure.Figure(figsize=(width, height), dpi=90)
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.15 / width,
        bottom=(labels_inches + 0.45) / height,
        top=1 - 0.35 / height,
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    good = np.isfinite(values) & (values > 0)
    floor = values[good].min() / 10 if good.any() else 1e-8
    heights = np.where(good, values, floor)
    bars = ax.bar(range(len(probes)), heights, color="#2a788e")
    for bar, value, ok in zip(bars, values, good, strict=True):
        if not ok:
            bar.set_color("#c0392b")
            ax.annotate(
                number(value),
                (bar.get_x() + bar.get_width() / 2, floor),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#c0392b",
            )
    finite = values[np.isfinite(values)]
    reference = float(finite[-1]) if finite.size else math.nan  # the last probe's
    if reference > 0:
        threshold = ratio * reference
        if good.any() and values[good].min() < 10 * threshold:
            ax.axhline(
                threshold,
                color="#c0392b",
                linestyle="--",
                linewidth=1,
                label=f"vanishing: {ratio:g} x last probe",
            )
            ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_yscale("log")
    ax.set_xticks(range(len(probes)), list(probes), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("probe (forward order)")
    ax.set_ylabel("grad_norm (log scale)")
    ax.set_title(title, loc="left", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    width, height = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    return buffer.getvalue(), width, height
