"""The `events` sink: recorded events in memory, and their columns.

An event is a dict with keys `"kind"`, `"epoch"`, `"step"`,
`"statistics"` (`{probe: {statistic: float}}`), `"histograms"` and
`"weight_grad_norms"` (`{variable path: float}`). `to_columns` lays the
events of one kind out as one array per log key, as `History` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_actgrad._tags import WEIGHTS_LOG_PREFIX, log_key, parse_key, weight_log_key


def to_columns(
    events: Sequence[dict[str, Any]], kind: str, kinds: Sequence[str]
) -> dict[str, np.ndarray]:
    """The events of one kind as NumPy arrays (see the callbacks' `to_numpy`)."""
    if kind not in kinds:
        accepted = ", ".join(repr(k) for k in kinds)
        raise ValueError(f"`kind` must be one of {accepted}. Received: kind={kind!r}.")
    chosen = [event for event in events if event["kind"] == kind]
    columns: dict[str, list[float]] = {
        "epoch": [math.nan if e["epoch"] is None else e["epoch"] for e in chosen],
        "step": [e["step"] for e in chosen],
    }
    keys: dict[str, None] = {}
    for event in chosen:
        for probe, values in event["statistics"].items():
            for name in values:
                keys[log_key(probe, name)] = None
        for path in event["weight_grad_norms"]:
            keys[weight_log_key(path)] = None
    for key in keys:
        columns[key] = [_lookup(event, key) for event in chosen]
    return {
        key: np.asarray(values, dtype=np.int64 if key == "step" else np.float64)
        for key, values in columns.items()
    }


def history(columns: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Columns as plain lists keyed like `History.history` (no `step`)."""
    columns = dict(columns)
    out: dict[str, list[float]] = {"epoch": columns.pop("epoch").astype(int).tolist()}
    del columns["step"]
    out.update((key, values.tolist()) for key, values in columns.items())
    return out


def _lookup(event: dict[str, Any], key: str) -> float:
    parsed = parse_key(key)
    if parsed is None:
        return math.nan
    prefix, name, statistic = parsed
    if prefix == WEIGHTS_LOG_PREFIX:
        return float(event["weight_grad_norms"].get(name, math.nan))
    return float(event["statistics"].get(name, {}).get(statistic, math.nan))
