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
  (`loss="sum"`, reduction `"sum"`) needs no scale, but a summed compiled
  loss must not hold activity regularizers (averaged, so off by `N / n`:
  refused by `averaged`);
- sums and counts add; maxima take the maximum (NaN if any is NaN, as
  NumPy's `max`); means are weighted by the chunks' example counts; the
  activation's standard deviation combines the chunks' variances and means
  (Chan, Golub & LeVeque); dead units come from the per-unit nonzero counts
  summed over the chunks (`ChunkReducer` returns them);
- histograms: the whole batch's bins span its range, so a first pass over
  the chunks (`RangeReducer`, only when histograms are asked) finds each
  tap's range, and the second bins every chunk in it (`Moments.histogram`'s
  `bounds`, an input of the compiled pass); the counts add. Gradients are
  scaled by `n / N` on the device before both, so an entry lands in the bin
  the whole batch's pass puts it in (up to float32 rounding of the
  gradient itself: an entry within rounding of a bin edge may fall either
  side);
- weight gradients: the whole batch's is the sum of the chunks' scaled by
  `n / N` (a summed loss: by 1), accumulated on the device (one copy of the
  weights) and reduced to norms at the end. A loss averaged over the batch
  counts a term that is not per-example (weight regularization) once, as
  the shares sum to 1; a summed one would count it once per chunk, so
  weight regularization with a summed loss is refused (`check_weights`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._backends import moments_class
from keras_actgrad._layers import layer_keys
from keras_actgrad._statistics.statistics import (
    Reduced,
    StatisticsReducer,
    Tensor,
    _finish,
    _unpack_histogram,
)
from keras_actgrad._training_loss import TrainingLoss

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
            (`"mean_with_sample_weight"`, `"none"`, or a mix of means and
            sums), and for a compiled loss summed over the batch in a model
            with activity regularizers (Keras averages those over the
            batch: a chunk's would be `N / n` times too large).
    """
    if isinstance(loss, TrainingLoss):
        raise ValueError(
            "`probe_batch_size` splits the probe batch into chunks, but a "
            "`TrainingLoss` is a function of the whole batch whose reduction "
            "over it is unknown. Pass a smaller probe batch instead, with "
            f"probe_batch_size=None. Received: loss={loss!r}."
        )
    if isinstance(loss, str) and loss == "sum":
        return False
    spec = model.loss if isinstance(loss, str) and loss == "model" else loss
    reductions = {
        "sum_over_batch_size" if r == "mean" else r for r in _reductions(spec)
    }
    if reductions <= {"sum_over_batch_size"}:
        return True
    if reductions == {"sum"}:
        regularized = [
            key
            for key, layer in layer_keys(model)
            if getattr(layer, "activity_regularizer", None) is not None
        ]
        if isinstance(loss, str) and loss == "model" and regularized:
            raise ValueError(
                "`probe_batch_size` splits the probe batch into chunks, and "
                "a compiled loss summed over the batch (reduction 'sum') "
                "adds the activity regularizers that Keras averages over the "
                "batch: their gradients would not add up over the chunks. "
                "Use a loss averaged over the batch (reduction "
                "'sum_over_batch_size', the Keras default), `loss='sum'` or "
                "a loss of your own (which leave regularizers out), or "
                "`probe_batch_size=None`. Received: loss reduction 'sum' and "
                f"activity regularizers on {regularized}."
            )
        return False
    raise ValueError(
        "`probe_batch_size` splits the probe batch into chunks and combines "
        "their statistics exactly, which needs a loss averaged over the batch "
        "(reduction 'sum_over_batch_size', the Keras default) or summed over "
        "it (reduction 'sum'). Use such a loss, or probe the batch whole "
        "(`probe_batch_size=None`). Received: loss reductions "
        f"{sorted(map(str, reductions))}."
    )


def check_weights(model: keras.Model, loss: Any, mean_loss: bool) -> None:
    """Checks that the chunks' weight gradients add up to the batch's.

    Raises:
        ValueError: for weight regularization under a summed compiled loss
            (each chunk's loss holds the whole regularization term).
    """
    if mean_loss or not (isinstance(loss, str) and loss == "model"):
        return
    regularized = [v.path for v in model.trainable_weights if v.regularizer]
    if regularized:
        raise ValueError(
            "`weight_gradients=True` with `probe_batch_size` sums the chunks' "
            "weight gradients, which counts a weight regularization term once "
            "per chunk under a loss summed over the batch (reduction 'sum'). "
            "Use a loss averaged over the batch (reduction "
            "'sum_over_batch_size', the Keras default, which counts it once), "
            "`weight_gradients=False`, or `probe_batch_size=None`. Received: "
            f"loss reduction 'sum' and regularized weights {regularized}."
        )


def _flat(x: Tensor) -> Tensor:
    return keras.ops.reshape(keras.ops.cast(x, "float32"), (-1,))


def _range(x: Tensor, finite: Tensor) -> Tensor:
    """`[low, high, finite]`: the range of the finite entries of `x`."""
    ops = keras.ops
    flat = _flat(x)

    def plain() -> Tensor:
        return ops.stack([ops.min(flat), ops.max(flat)])

    def masked() -> Tensor:
        mask = ops.isfinite(flat)
        low = ops.min(ops.where(mask, flat, float("inf")))
        return ops.stack([low, ops.max(ops.where(mask, flat, float("-inf")))])

    flag = ops.reshape(ops.cast(finite, "float32"), (1,))
    return ops.concatenate([ops.cond(finite, plain, masked), flag])


def _scaled(gradient: Tensor | None, share: Tensor, scale: bool) -> Tensor | None:
    if gradient is None or not scale:
        return gradient
    return keras.ops.cast(gradient, "float32") * share


# A probe's row of `RangeReducer`: gradient low, high, finite; activation's.
RANGE_WIDTH = 6


@dataclasses.dataclass(frozen=True)
class RangeReducer:
    """The first pass of chunked histograms: each tap's range in one chunk.

    Returns, per tap (sorted by name), `[low, high, finite]` of its gradient
    (scaled by `inputs["share"]` when `scale_gradients`) and of its
    activation: the finite entries' minimum and maximum, and whether every
    entry is finite (`Moments.grad_finite` / `act_finite`, the test that
    picks the whole batch's histogram path).
    """

    scale_gradients: bool = True

    @property
    def key(self) -> Hashable:
        return ("ranges", self.scale_gradients)

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
        inputs: Any = None,
    ) -> Tensor:
        ops = keras.ops
        probe_class = moments_class()
        share = inputs["share"]
        rows = []
        for name in sorted(activations):
            gradient = _scaled(gradients.get(name), share, self.scale_gradients)
            probe = probe_class(activations[name], gradient)
            if probe.g is None:
                rows.append(
                    ops.convert_to_tensor([float("inf"), float("-inf"), 1.0], "float32")
                )
            else:
                rows.append(_range(probe.g, probe.grad_finite()))
            rows.append(_range(probe.a, probe.act_finite()))
        return ops.concatenate(rows) if rows else ops.zeros((0,), "float32")


def merge_ranges(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The whole batch's ranges `[probes, 6]` from the chunks' `RangeReducer`s."""
    rows = np.stack(
        [np.asarray(v, np.float32).reshape(-1, RANGE_WIDTH) for v in vectors]
    )
    merged = np.empty(rows.shape[1:], np.float32)
    for offset in (0, 3):
        merged[:, offset] = rows[:, :, offset].min(axis=0)
        merged[:, offset + 1] = rows[:, :, offset + 1].max(axis=0)
        merged[:, offset + 2] = rows[:, :, offset + 2].min(axis=0)
    return merged


@dataclasses.dataclass(frozen=True)
class ChunkReducer(StatisticsReducer):
    """The reducer of one chunk of a probe batch (see the module docstring).

    Takes `inputs`: `"share"` (the chunk's share of the loss, a float32
    scalar), with histograms `"ranges"` (`merge_ranges`, `[probes, 6]`),
    with weight gradients `"weight_sums"` (per variable path, the sum of the
    previous chunks' scaled gradients). Returns a dict: `"vector"` (the
    moments and histograms laid out as `StatisticsReducer`'s, without
    weight-gradient norms), `"counts"` (each tap's per-unit nonzero counts)
    and, with weight gradients, `"device"`: the sums including this chunk,
    left on the device for the next one, and `"missing"`: 1.0 per variable
    without a gradient (sorted by path).
    """

    scale_gradients: bool = True

    @property
    def key(self) -> Hashable:
        return ("chunk", self.statistics, self.bins, self.scale_gradients)

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
        inputs: Any = None,
    ) -> Any:
        ops = keras.ops
        share = inputs["share"]
        probe_class = moments_class()
        moments = self.moments
        parts = []
        counts = []
        for index, name in enumerate(sorted(activations)):
            probe = probe_class(activations[name], gradients.get(name))
            parts.append(probe.row(moments))
            counts.append(probe._unit_counts())
            if not self.bins:
                continue
            bounds = inputs["ranges"][index]
            if probe.g is None:
                parts.append(
                    ops.convert_to_tensor(
                        [float("inf"), float("-inf")] + [0.0] * self.bins, "float32"
                    )
                )
            else:
                scaled = probe_class(
                    activations[name], _scaled(probe.g, share, self.scale_gradients)
                )
                parts.append(
                    scaled.histogram(
                        "g", self.bins, (bounds[0], bounds[1], bounds[2] > 0)
                    )
                )
            parts.append(
                probe.histogram("a", self.bins, (bounds[3], bounds[4], bounds[5] > 0))
            )
        vector = ops.concatenate(parts) if parts else ops.zeros((0,), "float32")
        output = {"vector": vector, "counts": counts}
        if weight_gradients:
            sums = inputs["weight_sums"]
            output["device"] = {
                path: (
                    ops.full_like(sums[path], float("nan"))
                    if gradient is None
                    else sums[path] + ops.cast(gradient, "float32") * share
                )
                for path, gradient in weight_gradients.items()
            }
            # 1.0 for a variable without a gradient (sorted by path).
            output["missing"] = ops.convert_to_tensor(
                [float(weight_gradients[p] is None) for p in sorted(weight_gradients)],
                "float32",
            )
        return output


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


def _histograms(
    reducer: StatisticsReducer, vectors: list[np.ndarray], index: int
) -> dict[str, tuple[float, float, np.ndarray]]:
    """A tap's histograms: the chunks' counts summed (one range for all)."""
    width = 2 + reducer.bins
    start = index * reducer.row_size + len(reducer.moments)
    found = {}
    for offset, kind in ((0, "gradient"), (width, "activation")):
        rows = [v[start + offset : start + offset + width] for v in vectors]
        counts = np.sum([np.rint(r[2:]).astype(np.int64) for r in rows], axis=0)
        low, high = rows[0][:2]
        found[kind] = _unpack_histogram(np.concatenate([[low, high], counts]))
    return found


def combine(
    reducer: StatisticsReducer,
    outputs: Sequence[Any],
    rows: Sequence[int],
    probes: Sequence[str],
    mean_loss: bool,
) -> Reduced:
    """The whole batch's statistics and histograms from its chunks' outputs.

    `outputs[k]` is chunk k's `ChunkReducer` output (a dict with `"vector"`
    and `"counts"`), `rows[k]` its number of examples.
    """
    names = sorted(probes)
    total = float(sum(rows))
    vectors = [np.asarray(out["vector"], np.float32).reshape(-1) for out in outputs]
    parts = [_moments(reducer, vector, names) for vector in vectors]
    statistics: dict[str, dict[str, float]] = {}
    histograms: dict[str, dict[str, tuple[float, float, np.ndarray]]] = {}
    for p, name in enumerate(names):
        if reducer.bins:
            histograms[name] = _histograms(reducer, vectors, p)
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
                counts = sum(
                    np.asarray(out["counts"][p], dtype=np.float64) for out in outputs
                )
                combined[moment] = np.float64(np.sum(counts == 0.0))
            else:  # pragma: no cover - every moment is listed above
                raise ValueError(
                    f"Internal error: no chunk combination for {moment!r}."
                )
        statistics[name] = {
            stat: _finish(stat, combined) for stat in reducer.statistics
        }
    return Reduced(statistics, histograms, {})
