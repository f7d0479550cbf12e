"""Per-probe statistics, reduced on the device in float32.

The names here are the public vocabulary of the logs: every log key is built
by `log_key`, nowhere else.

`StatisticsReducer` runs inside the engine's compiled probe function, so the
reductions run with the forward and backward pass and only a single float32
vector leaves the device: the moments of every probe (sums, maxima, counts:
the passes over the tensors), optional histogram counts, optional
weight-gradient norms. `unpack` turns the moments into the statistics on the
host. The moments are written with `keras.ops`, so every backend can run
them; an adapter may register native ones (`register_moments`) where they
are faster.
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
#
# The device reduces each probe to a few *moments*: sums, maxima and counts
# over the whole tensor (e.g. the sum of squares of the gradient, the number
# of its nonzero entries). Every statistic is a closed form of these scalars,
# evaluated on the host in float64 by `_finish`. So the device does only the
# passes over the tensors, each once, and no per-statistic scalar arithmetic
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


def _closed_form(name: str, m: dict[str, np.float64]) -> Any:
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


def _float32(x: Tensor) -> Tensor:
    return keras.ops.cast(x, "float32")


def _nan() -> Tensor:
    return keras.ops.convert_to_tensor(float("nan"), "float32")


def _static(shape: Sequence[int | None]) -> bool:
    return all(isinstance(d, int) for d in shape)


class _Probe:
    """Lazily computed moments of one probe (each reduction done once).

    Written with `keras.ops`, so every backend can run it (JAX does). A
    backend adapter may register a subclass with native ops where they are
    faster (`register_moments`): the same moments, in fewer passes over the
    tensors (TensorFlow) or without a Keras op dispatch each, where the pass
    runs eagerly (PyTorch).
    """

    def __init__(self, activation: Tensor, gradient: Tensor | None) -> None:
        self.a = _float32(activation)
        self.g = None if gradient is None else _float32(gradient)
        self._cache: dict[str, Tensor] = {}

    def _get(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    # Gradient moments.

    def _sample_norms(self) -> Tensor:
        """The L2 norm of each example's gradient (`[batch]`)."""

        def compute() -> Tensor:
            ops = keras.ops
            g: Tensor = self.g
            rank = len(g.shape)
            if rank == 0:
                return ops.reshape(ops.abs(g), (1,))
            if rank == 1:
                return ops.abs(g)
            if _static(g.shape[1:]):
                rows = ops.reshape(g, (-1, math.prod(g.shape[1:])))
                return ops.norm(rows, axis=1)
            return ops.sqrt(ops.sum(ops.square(g), axis=tuple(range(1, rank))))

        return self._get("_sample_norms", compute)

    def _abs_g(self) -> Tensor:
        return self._get("_abs_g", lambda: keras.ops.abs(self.g))

    def g_sum_sq(self) -> Tensor:
        return self._get(
            "g_sum_sq", lambda: keras.ops.sum(keras.ops.square(self._sample_norms()))
        )

    def grad_finite(self) -> Tensor:
        """True when every gradient entry is finite (one scalar test).

        A sum of squares is finite only if every entry is (it can also
        overflow for entries above ~1e19, which only costs the slow path).
        """
        return self._get("_g_finite", lambda: keras.ops.isfinite(self.g_sum_sq()))

    def act_finite(self) -> Tensor:
        return self._get("_a_finite", lambda: keras.ops.isfinite(self.a_mean()))

    def moment(self, name: str) -> Tensor:
        if name.startswith("g_") and self.g is None:
            return _nan()
        return self._get(name, getattr(self, name))

    def g_size(self) -> Tensor:
        return _float32(keras.ops.size(self.g))

    def g_sum(self) -> Tensor:
        return keras.ops.sum(self.g)

    def g_abs_sum(self) -> Tensor:
        return keras.ops.sum(self._abs_g())

    def g_abs_max(self) -> Tensor:
        # NaN if any entry is NaN, as NumPy's `max` (XLA's max may skip NaN).
        ops = keras.ops
        largest = ops.max(self._abs_g())
        return ops.cond(
            self.grad_finite(),
            lambda: largest,
            lambda: ops.where(ops.any(ops.isnan(self.g)), _nan(), largest),
        )

    def g_nonzero(self) -> Tensor:
        # NaN counts as nonzero, as `g != 0` says.
        return keras.ops.sum(_float32(keras.ops.not_equal(self.g, 0.0)))

    def g_sample_norm_mean(self) -> Tensor:
        return keras.ops.mean(self._sample_norms())

    def g_sample_norm_max(self) -> Tensor:
        return keras.ops.max(self._sample_norms())

    def g_nonfinite(self) -> Tensor:
        ops = keras.ops
        g = self.g
        return ops.cond(
            self.grad_finite(),
            lambda: ops.zeros((), "float32"),
            lambda: ops.sum(_float32(ops.logical_not(ops.isfinite(g)))),
        )

    # Activation moments.

    def a_mean(self) -> Tensor:
        return self._get("a_mean", lambda: keras.ops.mean(self.a))

    def a_size(self) -> Tensor:
        return _float32(keras.ops.size(self.a))

    def a_std(self) -> Tensor:
        # The corrected two-pass algorithm (mean, then the centred moments):
        # activations often have a mean far from 0 relative to their spread
        # (e.g. sigmoid outputs), where E[a^2] - E[a]^2 would cancel. The
        # mean of the centred values removes the rounding error of the first
        # mean (Chan, Golub & LeVeque, 1983).
        ops = keras.ops
        centred = ops.reshape(self.a - self.a_mean(), (-1,))
        size = self.a_size()
        variance = ops.square(ops.norm(centred)) / size
        variance -= ops.square(ops.sum(centred) / size)
        return ops.sqrt(ops.maximum(variance, 0.0))

    def _unit_counts(self) -> Tensor:
        """The number of nonzero entries of each unit (index of the last axis).

        Without a last axis, the whole tensor is one unit. NaN is nonzero.
        """

        def compute() -> Tensor:
            ops = keras.ops
            nonzero = _float32(ops.not_equal(self.a, 0.0))
            rank = len(nonzero.shape)
            if rank <= 1:
                return ops.reshape(ops.sum(nonzero), (1,))
            return ops.sum(nonzero, axis=tuple(range(rank - 1)))

        return self._get("_unit_counts", compute)

    def a_nonzero(self) -> Tensor:
        return keras.ops.sum(self._unit_counts())

    def a_dead(self) -> Tensor:
        return keras.ops.sum(_float32(keras.ops.equal(self._unit_counts(), 0.0)))

    def a_units(self) -> Tensor:
        return _float32(keras.ops.size(self._unit_counts()))

    def histogram(self, which: str, bins: int) -> Tensor:
        """The histogram (see `histogram`) of the activation (`"a"`) or gradient."""
        if which == "a":
            return histogram(self.a, bins, self.act_finite())
        return histogram(self.g, bins, self.grad_finite())

    def row(self, moments: Sequence[str]) -> Tensor:
        """The given moments as one float32 vector."""
        return keras.ops.stack([_float32(self.moment(m)) for m in moments])


# Faster moment implementations registered by backend adapters.
_PROBE_CLASSES: dict[str, type[_Probe]] = {}


def register_moments(backend: str, probe_class: type[_Probe]) -> None:
    """Makes `StatisticsReducer` use `probe_class` on `backend`.

    `probe_class` computes the same moments as `_Probe` (it is tested
    against the same NumPy definitions), with the backend's native ops.
    """
    _PROBE_CLASSES[backend] = probe_class


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
        ops = keras.ops
        parts = []
        nan_row = None
        moments = self.moments
        probe_class = _PROBE_CLASSES.get(keras.backend.backend(), _Probe)
        for name in sorted(activations):
            probe = probe_class(activations[name], gradients.get(name))
            parts.append(probe.row(moments))
            if self.bins:
                if probe.g is None:
                    if nan_row is None:
                        nan_row = ops.convert_to_tensor(
                            [float("inf"), float("-inf")] + [0.0] * self.bins,
                            "float32",
                        )
                    parts.append(nan_row)
                else:
                    parts.append(probe.histogram("g", self.bins))
                parts.append(probe.histogram("a", self.bins))
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
        moments = self.moments
        s = len(moments)
        for i, name in enumerate(names):
            row = vector[i * self.row_size : (i + 1) * self.row_size]
            values = {m: np.float64(row[j]) for j, m in enumerate(moments)}
            statistics[name] = {stat: _finish(stat, values) for stat in self.statistics}
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
