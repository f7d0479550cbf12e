"""Per-probe statistics, reduced on the device in float32.

The names here are the public vocabulary of the logs: every log key is built
by `log_key`, nowhere else.

`StatisticsReducer` runs inside the engine's compiled probe function, so the
reductions are fused with the forward and backward pass and only a single
float32 vector leaves the device: the statistics of every probe, optional
histogram counts, optional weight-gradient norms. It uses `keras.ops` only,
so every backend adapter can call it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import keras
import numpy as np

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

LOG_PREFIX = "actgrad"

DEFAULT_BINS = 30


def log_key(probe: str, statistic: str) -> str:
    """The `logs` key (and TensorBoard scalar tag) of a probe's statistic."""
    return f"{LOG_PREFIX}/{probe}/{statistic}"


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


# ---------------------------------------------------------------------------
# On-device reductions.


def _float32(x: Tensor) -> Tensor:
    return keras.ops.cast(x, "float32")


def _fraction(condition: Tensor) -> Tensor:
    return keras.ops.mean(_float32(condition))


def _nan() -> Tensor:
    return keras.ops.convert_to_tensor(float("nan"), "float32")


class _Probe:
    """Lazily computed statistics of one probe (each reduction done once).

    Intermediate results (squares, absolute values, zero masks, sums) are
    shared between statistics, so each full pass over the tensor happens
    once per probe.
    """

    def __init__(self, activation: Tensor, gradient: Tensor | None) -> None:
        self.a = _float32(activation)
        self.g = None if gradient is None else _float32(gradient)
        self._cache: dict[str, Tensor] = {}

    def _get(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    def _sample_sq(self) -> Tensor:
        def compute() -> Tensor:
            g: Tensor = self.g
            rank = len(g.shape)
            if rank == 0:
                g = keras.ops.reshape(g, (1,))
            sq = keras.ops.square(g)
            if rank <= 1:
                return sq
            return keras.ops.sum(sq, axis=tuple(range(1, rank)))

        return self._get("_sample_sq", compute)

    def _sum_sq(self) -> Tensor:
        return self._get("_sum_sq", lambda: keras.ops.sum(self._sample_sq()))

    def _sample_norms(self) -> Tensor:
        return self._get("_sample_norms", lambda: keras.ops.sqrt(self._sample_sq()))

    def _abs_g(self) -> Tensor:
        return self._get("_abs_g", lambda: keras.ops.abs(self.g))

    def _a_nonzero(self) -> Tensor:
        return self._get("_a_nonzero", lambda: keras.ops.not_equal(self.a, 0.0))

    def _a_mean(self) -> Tensor:
        return self._get("_a_mean", lambda: keras.ops.mean(self.a))

    def grad_finite(self) -> Tensor:
        """True when every gradient entry is finite (one scalar test).

        A sum of squares is finite only if every entry is (it can also
        overflow for entries above ~1e19, which only costs the slow path).
        """
        return self._get("_g_finite", lambda: keras.ops.isfinite(self._sum_sq()))

    def act_finite(self) -> Tensor:
        return self._get("_a_finite", lambda: keras.ops.isfinite(self._a_mean()))

    def statistic(self, name: str) -> Tensor:
        if name in GRADIENT_STATISTICS and self.g is None:
            return _nan()
        ops = keras.ops
        compute: dict[str, Callable[[], Tensor]] = {
            "grad_norm": lambda: ops.sqrt(self._sum_sq()),
            "grad_mean_abs": lambda: ops.mean(self._abs_g()),
            "grad_std": self._grad_std,
            "grad_max_abs": lambda: ops.max(self._abs_g()),
            "grad_zero_fraction": self._grad_zero_fraction,
            "act_mean": self._a_mean,
            "act_std": lambda: ops.sqrt(ops.mean(ops.square(self.a - self._a_mean()))),
            "act_zero_fraction": self._act_zero_fraction,
            "dead_unit_fraction": self._dead_unit_fraction,
            "sample_grad_norm_mean": lambda: ops.mean(self._sample_norms()),
            "sample_grad_norm_max": lambda: ops.max(self._sample_norms()),
            "nonfinite": self._nonfinite,
        }
        return self._get(name, compute[name])

    def _nonfinite(self) -> Tensor:
        g = self.g
        return keras.ops.cond(
            self.grad_finite(),
            lambda: keras.ops.zeros((), "float32"),
            lambda: keras.ops.sum(
                _float32(keras.ops.logical_not(keras.ops.isfinite(g)))
            ),
        )

    def _grad_zero_fraction(self) -> Tensor:
        ops = keras.ops
        g = self.g
        abs_g = self._abs_g()
        # sign(|g|) is 1 where g != 0 (two passes, reusing |g|); NaN entries
        # would make it NaN, so the non-finite case compares instead.
        return ops.cond(
            self.grad_finite(),
            lambda: 1.0 - ops.mean(ops.sign(abs_g)),
            lambda: _fraction(ops.equal(g, 0.0)),
        )

    def _grad_std(self) -> Tensor:
        # From the moments, reusing the sum of squares of `grad_norm`: one
        # pass instead of three. Gradients have |mean| << std in practice, so
        # the cancellation in E[g^2] - E[g]^2 costs no precision worth having.
        ops = keras.ops
        size = _float32(ops.size(self.g))
        mean = ops.sum(self.g) / size
        variance = ops.maximum(self._sum_sq() / size - ops.square(mean), 0.0)
        return ops.sqrt(variance)

    def _unit_counts(self) -> Tensor:
        """Number of nonzero activation entries per unit (last axis)."""

        def compute() -> Tensor:
            nonzero = _float32(self._a_nonzero())
            rank = len(nonzero.shape)
            if rank <= 1:
                # No unit axis: the whole tensor is one unit.
                return keras.ops.reshape(keras.ops.sum(nonzero), (1,))
            return keras.ops.sum(nonzero, axis=tuple(range(rank - 1)))

        return self._get("_unit_counts", compute)

    def _act_zero_fraction(self) -> Tensor:
        size = _float32(keras.ops.size(self.a))
        return 1.0 - keras.ops.sum(self._unit_counts()) / size

    def _dead_unit_fraction(self) -> Tensor:
        return _fraction(keras.ops.equal(self._unit_counts(), 0.0))


def _count(index: Tensor, weights: Tensor | None, bins: int) -> Tensor:
    """Counts of `index` values in `[0, bins]`, the last folded into `bins - 1`.

    Index `bins` holds the entries equal to the maximum (the last bin is
    closed); folding it on the small count vector saves a clamping pass over
    the data. Returns float32 counts of shape `[bins]`.
    """
    ops = keras.ops
    if keras.backend.backend() == "jax":
        # jnp.bincount needs a static length; segment_sum has one.
        data = ops.ones_like(index, "float32") if weights is None else weights
        counts = ops.segment_sum(data, index, num_segments=bins + 1)
    else:
        # TensorFlow and torch: bincount is several times faster than their
        # segment sums on CPU. `index <= bins`: the length is `bins + 1`.
        counts = ops.bincount(index, weights=weights, minlength=bins + 1)
        counts = ops.reshape(_float32(counts), (bins + 1,))
    return ops.concatenate(
        [counts[: bins - 1], ops.reshape(counts[bins - 1] + counts[bins], (1,))]
    )


def histogram(x: Tensor, bins: int, finite: Tensor | None = None) -> Tensor:
    """`[low, high, count_1, ..., count_bins]` of the finite entries of `x`.

    `bins` equal-width bins over `[low, high]` = the range of the finite
    entries; the last bin is closed on both sides. When every finite entry
    has the same value, all of them are counted in the first bin (the writer
    lays that case out as TensorBoard does). Without finite entries, `low` is
    +inf, `high` is -inf and all counts are 0. `finite`, a scalar boolean
    that is True only if every entry is finite, selects a faster path.
    """
    ops = keras.ops
    flat = ops.reshape(_float32(x), (-1,))

    def bucket(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
        width = high - low
        scale = ops.where(width > 0, bins / ops.where(width > 0, width, 1.0), 0.0)
        # values >= low, so truncation is floor; the index is in [0, bins],
        # `bins` only for the maximum (see `_count`).
        return ops.cast((values - low) * scale, "int32")

    def all_finite() -> Tensor:
        low, high = ops.min(flat), ops.max(flat)
        counts = _count(bucket(flat, low, high), None, bins)
        return ops.concatenate([ops.stack([low, high]), counts])

    def some_nonfinite() -> Tensor:
        mask = ops.isfinite(flat)
        low = ops.min(ops.where(mask, flat, float("inf")))
        high = ops.max(ops.where(mask, flat, float("-inf")))
        safe_low = ops.where(ops.isfinite(low), low, 0.0)
        index = bucket(ops.where(mask, flat, safe_low), safe_low, high)
        counts = _count(index, _float32(mask), bins)
        return ops.concatenate([ops.stack([low, high]), counts])

    if finite is None:
        finite = ops.isfinite(ops.sum(flat))
    return ops.cond(finite, all_finite, some_nonfinite)


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
    def row_size(self) -> int:
        return len(self.statistics) + (2 * (2 + self.bins) if self.bins else 0)

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
    ) -> Tensor:
        ops = keras.ops
        parts = []
        nan_row = None
        for name in sorted(activations):
            probe = _Probe(activations[name], gradients.get(name))
            parts.append(ops.stack([probe.statistic(s) for s in self.statistics]))
            if self.bins:
                if probe.g is None:
                    if nan_row is None:
                        nan_row = ops.convert_to_tensor(
                            [float("inf"), float("-inf")] + [0.0] * self.bins,
                            "float32",
                        )
                    parts.append(nan_row)
                else:
                    parts.append(histogram(probe.g, self.bins, probe.grad_finite()))
                parts.append(histogram(probe.a, self.bins, probe.act_finite()))
        norms = []
        for path in sorted(weight_gradients):
            gradient = weight_gradients[path]
            if gradient is None:
                norms.append(_nan())
            else:
                norms.append(ops.sqrt(ops.sum(ops.square(_float32(gradient)))))
        if norms:
            parts.append(ops.stack(norms))
        if not parts:
            return ops.zeros((0,), "float32")
        return ops.concatenate(parts)

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
        statistics: dict[str, dict[str, float]] = {}
        histograms: dict[str, dict[str, tuple[float, float, np.ndarray]]] = {}
        s = len(self.statistics)
        for i, name in enumerate(names):
            row = vector[i * self.row_size : (i + 1) * self.row_size]
            statistics[name] = {
                stat: float(row[j]) for j, stat in enumerate(self.statistics)
            }
            if self.bins:
                width = 2 + self.bins
                gradient = row[s : s + width]
                activation = row[s + width : s + 2 * width]
                histograms[name] = {
                    "gradient": _unpack_histogram(gradient),
                    "activation": _unpack_histogram(activation),
                }
        norms = {path: float(vector[rows + j]) for j, path in enumerate(weights)}
        return Reduced(statistics, histograms, norms)


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
