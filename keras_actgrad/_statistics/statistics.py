"""Per-tap statistics: their names, the reducer, their closed forms.

The statistic names are the public vocabulary of the logs (the keys are
built in `_tags.py`).

`StatisticsReducer` runs inside the engine's compiled pass, so the
reductions run with the forward and backward pass and only a single float32
vector leaves the device: the moments of every tap (`moments.py`),
optional histogram counts, optional weight-gradient norms. `unpack` turns
the moments into the statistics on the host. The moments class is the
backend's (`keras_actgrad._backends.moments_class`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._backends import moments_class

Tensor = Any

STATISTICS: tuple[str, ...] = (
    "grad_norm",
    "grad_mean_abs",
    "grad_std",
    "grad_max_abs",
    "grad_zero_fraction",
    "act_mean",
    "act_std",
    "act_zero_fraction",
    "dead_unit_fraction",
    "sample_grad_norm_mean",
    "sample_grad_norm_max",
    "nonfinite",
)

# Statistics that describe the gradient (NaN where a probe has none).
GRADIENT_STATISTICS = frozenset(
    name for name in STATISTICS if name.startswith(("grad_", "sample_grad_"))
) | {"nonfinite"}

DEFAULT_BINS = 30


def check_statistics(names: Sequence[str] | None, argument: str) -> tuple[str, ...]:
    """Validates a list of statistic names; `None` means all of them."""
    if names is None:
        return STATISTICS
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    unknown = [name for name in names if name not in STATISTICS]
    if unknown or not names:
        raise ValueError(
            f"Unknown statistic name(s) {unknown} in `{argument}`. Accepted "
            f"names: {list(STATISTICS)}"
            + (" (or None for all of them)" if argument == "statistics" else "")
            + f". Received: {argument}={list(names)!r}."
        )
    return tuple(dict.fromkeys(names))


# Every statistic is a closed form of the moments, evaluated on the host in
# float64 by `_finish`: the device does no per-statistic scalar arithmetic
# (which on PyTorch, where the pass runs eagerly, would cost a Keras op
# dispatch each).

# The moments each statistic needs.
_NEEDS: dict[str, tuple[str, ...]] = {
    "grad_norm": ("g_sum_sq",),
    "grad_mean_abs": ("g_abs_sum", "g_size"),
    "grad_std": ("g_sum", "g_sum_sq", "g_size"),
    "grad_max_abs": ("g_abs_max",),
    "grad_zero_fraction": ("g_nonzero", "g_size"),
    "act_mean": ("a_mean",),
    "act_std": ("a_std",),
    "act_zero_fraction": ("a_nonzero", "a_size"),
    "dead_unit_fraction": ("a_dead", "a_units"),
    "sample_grad_norm_mean": ("g_sample_norm_mean",),
    "sample_grad_norm_max": ("g_sample_norm_max",),
    "nonfinite": ("g_nonfinite",),
}

# Every moment, in the order they are laid out in the reducer's vector.
_MOMENTS: tuple[str, ...] = tuple(
    dict.fromkeys(moment for needs in _NEEDS.values() for moment in needs)
)


def moments_for(statistics: Sequence[str]) -> tuple[str, ...]:
    """The moments the given statistics need, in layout order."""
    needed = {moment for name in statistics for moment in _NEEDS[name]}
    return tuple(moment for moment in _MOMENTS if moment in needed)


def _finish(name: str, m: dict[str, np.float64]) -> float:
    """A statistic from its moments (host side, float64).

    An empty tensor gives NaN (0 / 0), as NumPy's reductions do.
    """
    with np.errstate(all="ignore"):
        return float(_closed_form(name, m))


def finish_rows(
    statistics: Sequence[str],
    moments: Sequence[str],
    rows: np.ndarray,
    names: Sequence[str],
) -> dict[str, dict[str, float]]:
    """`_finish` of every row of moments at once: `{name: {statistic: value}}`.

    `rows` holds one row of `moments` per name (float32, as the device
    returns them). The same float64 operations as `_finish`, on columns
    (one NumPy call a statistic, not one a probe and statistic: 242 probes
    took 13 ms an event one by one).
    """
    table = np.asarray(rows, dtype=np.float64).reshape(len(names), len(moments))
    columns = {m: table[:, j] for j, m in enumerate(moments)}
    with np.errstate(all="ignore"):
        values = [
            np.broadcast_to(_closed_form(stat, columns), (len(names),)).tolist()
            for stat in statistics
        ]
    return {
        name: {stat: column[i] for stat, column in zip(statistics, values, strict=True)}
        for i, name in enumerate(names)
    }


def _closed_form(name: str, m: dict[str, Any]) -> Any:
    if name == "grad_norm":
        return np.sqrt(m["g_sum_sq"])
    if name == "grad_mean_abs":
        return m["g_abs_sum"] / m["g_size"]
    if name == "grad_std":
        # From the moments: gradients have |mean| << std in practice, so the
        # cancellation in E[g^2] - E[g]^2 costs no precision worth having.
        mean = m["g_sum"] / m["g_size"]
        return np.sqrt(np.maximum(m["g_sum_sq"] / m["g_size"] - mean * mean, 0.0))
    if name == "grad_max_abs":
        return m["g_abs_max"]
    if name == "grad_zero_fraction":
        return 1.0 - m["g_nonzero"] / m["g_size"]
    if name == "act_zero_fraction":
        return 1.0 - m["a_nonzero"] / m["a_size"]
    if name == "dead_unit_fraction":
        return m["a_dead"] / m["a_units"]
    key = {
        "act_mean": "a_mean",
        "act_std": "a_std",
        "sample_grad_norm_mean": "g_sample_norm_mean",
        "sample_grad_norm_max": "g_sample_norm_max",
        "nonfinite": "g_nonfinite",
    }[name]
    return m[key]


# `combine`'s weight-gradient norm of a variable without a gradient.
_NO_GRADIENT = -1.0


@dataclasses.dataclass(frozen=True)
class StatisticsReducer:
    """Reduces a probe pass to statistics, histograms and weight-gradient norms.

    Called by the engine inside the compiled probe function. Returns one
    float32 vector: for each probe (sorted by name) its statistics in the
    order of `statistics`, then, with `bins > 0`, the gradient and the
    activation histogram (`2 + bins` values each, see `histogram`); then,
    with `weight_gradients`, the L2 norm of each weight gradient (sorted by
    variable path). `unpack` turns that vector back into named values.
    """

    statistics: tuple[str, ...]
    bins: int = 0

    @property
    def key(self) -> Hashable:
        return ("statistics", self.statistics, self.bins)

    @property
    def moments(self) -> tuple[str, ...]:
        return moments_for(self.statistics)

    @property
    def row_size(self) -> int:
        return len(self.moments) + (2 * (2 + self.bins) if self.bins else 0)

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
    ) -> Tensor:
        return self.combine(
            {name: self.reduce_activation(a) for name, a in activations.items()},
            {name: self.reduce_gradient(gradients.get(name)) for name in activations},
            weight_gradients,
        )

    def _moments_of(self, prefix: str) -> tuple[str, ...]:
        return tuple(m for m in self.moments if m.startswith(prefix))

    def reduce_activation(self, activation: Tensor) -> list[Any]:
        """One probe's activation share: its `a_*` moments, activation histogram.

        Needs no gradient, so an adapter may call it in the forward pass,
        where the activation appears: the backward pass then keeps no
        activation for the statistics' sake (`reduce_gradient` is the rest).
        """
        moments = self._moments_of("a_")
        if not moments and not self.bins:
            return []
        probe = moments_class()(activation, None)
        return probe.row_and_histogram(moments, "a", self.bins)

    def reduce_gradient(self, gradient: Tensor | None) -> list[Any]:
        """One probe's gradient share: its `g_*` moments, gradient histogram.

        `None` (no gradient reached the probe) gives NaN moments and an
        empty histogram. An adapter may call it inside the backward pass, as
        soon as the gradient exists, so that no gradient outlives it.
        """
        ops = keras.ops
        moments = self._moments_of("g_")
        parts: list[Any] = []
        if gradient is None:
            if moments:
                parts.append(ops.full((len(moments),), float("nan"), "float32"))
            if self.bins:
                parts.append(
                    ops.convert_to_tensor(
                        [float("inf"), float("-inf")] + [0.0] * self.bins, "float32"
                    )
                )
            return parts
        if not moments and not self.bins:
            return parts
        # The moments classes take an activation; the gradient stands in for
        # it (same shape and device), and no activation moment is read.
        g = ops.cast(gradient, "float32")
        probe = moments_class()(g, g)
        return probe.row_and_histogram(moments, "g", self.bins)

    def _order(self, probes: int, weights: int) -> np.ndarray | None:
        """Where each output entry is in `combine`'s concatenation (None: same).

        Each probe's shares are concatenated as gradient moments,
        activation moments, gradient histogram, activation histogram; the
        output row lays the moments out in `self.moments` order.
        """
        moments = self.moments
        split = self._moments_of("g_") + self._moments_of("a_")
        if split == moments:
            return None
        local = np.array([split.index(m) for m in moments])
        local = np.concatenate([local, np.arange(len(moments), self.row_size)])
        rows = [local + i * self.row_size for i in range(probes)]
        rows.append(probes * self.row_size + np.arange(weights))
        return np.concatenate(rows).astype("int32")

    def combine(
        self,
        activations: dict[str, list[Any]],
        gradients: dict[str, list[Any]],
        weight_gradients: dict[str, Tensor | None],
    ) -> Any:
        """The output from each probe's shares and the weight gradients.

        `activations[name]` is `reduce_activation`'s result for the probe,
        `gradients[name]` `reduce_gradient`'s (same keys).
        """
        ops = keras.ops
        parts = []
        for name in sorted(gradients):
            g_parts, a_parts = gradients[name], activations[name]
            if self._moments_of("g_"):
                parts.append(g_parts[0])
            if self._moments_of("a_"):
                parts.append(a_parts[0])
            parts.extend(g_parts[-1:] if self.bins else [])
            parts.extend(a_parts[-1:] if self.bins else [])
        norms = []
        for path in sorted(weight_gradients):
            gradient = weight_gradients[path]
            if gradient is None:
                # A norm is never negative: `unpack` tells a missing gradient
                # (NaN for the user) from a non-finite one by this mark.
                norms.append(ops.convert_to_tensor(_NO_GRADIENT, "float32"))
            else:
                norms.append(
                    ops.sqrt(ops.sum(ops.square(ops.cast(gradient, "float32"))))
                )
        if norms:
            parts.append(ops.stack(norms))
        if not parts:
            return ops.zeros((0,), "float32")
        vector = ops.concatenate(parts)
        order = self._order(len(gradients), len(norms))
        return vector if order is None else ops.take(vector, order)

    def unpack(
        self, vector: np.ndarray, probes: Sequence[str], weight_paths: Sequence[str]
    ) -> Reduced:
        """Splits the reducer's output vector into named values (host side)."""
        names = sorted(probes)
        rows = len(names) * self.row_size
        weights = sorted(weight_paths)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.size != rows + len(weights):
            raise RuntimeError(
                f"Internal error: the probe pass returned {vector.size} values, "
                f"expected {rows + len(weights)} for probes {names} and weight "
                f"gradients {weights}."
            )
        histograms: dict[str, dict[str, tuple[float, float, np.ndarray]]] = {}
        moments = self.moments
        s = len(moments)
        table = vector[:rows].reshape(len(names), self.row_size)
        statistics = finish_rows(self.statistics, moments, table[:, :s], names)
        for i, name in enumerate(names):
            row = table[i]
            if self.bins:
                width = 2 + self.bins
                gradient = row[s : s + width]
                activation = row[s + width : s + 2 * width]
                histograms[name] = {
                    "gradient": _unpack_histogram(gradient),
                    "activation": _unpack_histogram(activation),
                }
        values = [float(vector[rows + j]) for j in range(len(weights))]
        without = [path for path, v in zip(weights, values, strict=True) if v < 0]
        norms = {
            path: math.nan if v < 0 else v
            for path, v in zip(weights, values, strict=True)
        }
        return Reduced(statistics, histograms, norms, without)


def _unpack_histogram(values: np.ndarray) -> tuple[float, float, np.ndarray]:
    low, high = float(values[0]), float(values[1])
    counts = np.rint(values[2:]).astype(np.int64)
    if not math.isfinite(low) or counts.sum() == 0:
        return float("nan"), float("nan"), np.zeros_like(counts)
    return low, high, counts


@dataclasses.dataclass
class Reduced:
    """One probe pass, reduced: what the callback logs and writes."""

    statistics: dict[str, dict[str, float]]
    histograms: dict[str, dict[str, tuple[float, float, np.ndarray]]]
    weight_grad_norms: dict[str, float]
    # The variables that got no gradient (their norm is NaN).
    without_gradient: list[str] = dataclasses.field(default_factory=list)
