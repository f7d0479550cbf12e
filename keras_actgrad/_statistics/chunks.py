"""A probe batch in chunks: split it, scale each chunk, combine the moments.

`probe_batch_size` runs a probe batch larger than the device holds as
consecutive chunks, one pass each, and combines the chunks' moments on the
host in float64 into the whole batch's statistics:

- the gradient: a loss averaged over the batch (every Keras reduction
  `"sum_over_batch_size"`, Keras 3 activity regularizers divided by the
  batch size, `keras/src/layers/layer.py:1018-1028` in Keras 3.15) gives a
  chunk of `n` of `N` examples the gradient `N / n` times the whole batch's
  one; each chunk's gradient moments are scaled back by `n / N` (sums and
  maxima by it, the sum of squares by its square). A summed loss
  (`loss="sum"`, reduction `"sum"`) needs no scale;
- sums and counts add; maxima take the maximum (NaN if any is NaN, as
  NumPy's `max`); means are weighted by the chunks' example counts; the
  activation's standard deviation combines the chunks' variances and means
  (Chan, Golub & LeVeque); dead units come from the per-unit nonzero counts
  summed over the chunks (the reducer returns them with `unit_counts`).

Histograms need one range for the whole batch, and weight-gradient norms the
summed gradients: neither is combined (the callback refuses them with
`probe_batch_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._statistics.statistics import (
    Reduced,
    StatisticsReducer,
    _finish,
)

# Gradient moments scaled by the chunk's share (s = n / N) and by its square.
_LINEAR = frozenset(
    ["g_sum", "g_abs_sum", "g_abs_max", "g_sample_norm_mean", "g_sample_norm_max"]
)
_QUADRATIC = frozenset(["g_sum_sq"])
_ADDITIVE = frozenset(
    ["g_size", "g_nonzero", "g_nonfinite", "a_size", "a_nonzero", "g_sum"]
    + ["g_sum_sq", "g_abs_sum"]
)
_MAXIMA = frozenset(["g_abs_max", "g_sample_norm_max"])


def split(data: Any, size: int, total: int) -> list[Any]:
    """Consecutive slices of `size` examples of a (nested) batch of arrays."""
    if data is None:
        return [None] * len(range(0, total, size))
    return [
        keras.tree.map_structure(lambda leaf, s=start: leaf[s : s + size], data)
        for start in range(0, total, size)
    ]


def _reductions(loss: Any) -> list[Any]:
    if isinstance(loss, keras.losses.Loss):
        return [loss.reduction]
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            return ["sum_over_batch_size"]
        return _reductions(resolved) if resolved is not None else []
    if callable(loss) or loss is None:
        return ["sum_over_batch_size"]
    return [r for item in keras.tree.flatten(loss) for r in _reductions(item)]


def averaged(model: keras.Model, loss: Any) -> bool:
    """Whether the pass's loss is averaged over the batch (else summed).

    Raises:
        ValueError: for a loss whose reduction cannot be split exactly
            (`"mean_with_sample_weight"`, `"none"`, or a mix of means and sums).
    """
    if isinstance(loss, str) and loss == "sum":
        return False
    spec = model.loss if isinstance(loss, str) and loss == "model" else loss
    reductions = {
        "sum_over_batch_size" if r == "mean" else r for r in _reductions(spec)
    }
    if reductions <= {"sum_over_batch_size"}:
        return True
    if reductions == {"sum"}:
        return False
    raise ValueError(
        "`probe_batch_size` splits the probe batch into chunks and combines "
        "their statistics exactly, which needs a loss averaged over the batch "
        "(reduction 'sum_over_batch_size', the Keras default) or summed over "
        "it (reduction 'sum'). Use such a loss, or probe the batch whole "
        "(`probe_batch_size=None`). Received: loss reductions "
        f"{sorted(map(str, reductions))}."
    )


def _moments(
    reducer: StatisticsReducer, vector: np.ndarray, names: list[str]
) -> dict[str, dict[str, np.float64]]:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    moments = reducer.moments
    width = reducer.row_size
    return {
        name: {m: np.float64(vector[i * width + j]) for j, m in enumerate(moments)}
        for i, name in enumerate(names)
    }


def combine(
    reducer: StatisticsReducer,
    outputs: Sequence[Any],
    rows: Sequence[int],
    probes: Sequence[str],
    mean_loss: bool,
) -> Reduced:
    """The whole batch's statistics from its chunks' reducer outputs.

    `outputs[k]` is chunk k's `(vector, unit_counts)` (a reducer with
    `unit_counts=True`), `rows[k]` its number of examples.
    """
    names = sorted(probes)
    total = float(sum(rows))
    parts = [_moments(reducer, out[0], names) for out in outputs]
    statistics: dict[str, dict[str, float]] = {}
    for p, name in enumerate(names):
        chunks = [part[name] for part in parts]
        shares = [n / total for n in rows]
        scales = shares if mean_loss else [1.0] * len(rows)
        combined: dict[str, np.float64] = {}
        for moment in reducer.moments:
            values = np.array([c[moment] for c in chunks], dtype=np.float64)
            if moment in _QUADRATIC:
                values = values * np.square(scales)
            elif moment in _LINEAR:
                values = values * np.asarray(scales)
            if moment in _ADDITIVE:
                combined[moment] = np.float64(values.sum())
            elif moment in _MAXIMA:
                combined[moment] = np.float64(np.max(values))
            elif moment in ("g_sample_norm_mean", "a_mean"):
                combined[moment] = np.float64(np.dot(values, shares))
            elif moment == "a_std":
                means = np.array([c["a_mean"] for c in chunks], dtype=np.float64)
                mean = np.dot(means, shares)
                variance = np.dot(np.square(values) + np.square(means - mean), shares)
                combined[moment] = np.float64(np.sqrt(variance))
            elif moment == "a_units":
                combined[moment] = values[0]
            elif moment == "a_dead":
                counts = sum(np.asarray(out[1][p], dtype=np.float64) for out in outputs)
                combined[moment] = np.float64(np.sum(counts == 0.0))
            else:  # pragma: no cover - every moment is listed above
                raise ValueError(
                    f"Internal error: no chunk combination for {moment!r}."
                )
        statistics[name] = {
            stat: _finish(stat, combined) for stat in reducer.statistics
        }
    return Reduced(statistics, {}, {})
