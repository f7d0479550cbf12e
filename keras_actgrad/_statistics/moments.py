"""The moments of a tapped tensor, reduced on the device in float32.

The device reduces each tap's activation and gradient to a few *moments*:
sums, maxima and counts over the whole tensor (e.g. the sum of squares of
the gradient, the number of its nonzero entries), and optionally histogram
counts. Every statistic is a closed form of these scalars, evaluated on the
host (`statistics.py`). So the device does only the passes over the
tensors, each once.

`Moments` is written with `keras.ops` (every backend runs it); the
TensorFlow and PyTorch subclasses in `moments_tensorflow.py` and
`moments_torch.py` compute the same moments with native ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras

Tensor = Any

# Set while a pass or training step is traced for XLA (TensorFlow with
# `jit_compile=True`): the moments then build only ops XLA compiles (no
# `EuclideanNorm`, `HistogramFixedWidth`, nor a bincount, whose length is
# not a compile-time constant there).
_XLA = contextvars.ContextVar("keras_actgrad_xla", default=False)


@contextlib.contextmanager
def xla_compatible(enabled: bool = True) -> Iterator[None]:
    """Builds, in the block, only ops XLA compiles (a `jit_compile` trace)."""
    token = _XLA.set(bool(enabled))
    try:
        yield
    finally:
        _XLA.reset(token)


def in_xla() -> bool:
    """Whether the moments are being built for XLA (see `xla_compatible`)."""
    return _XLA.get()


# Set while a pass is traced for finite tensors only (see `assume_finite`).
_FINITE = contextvars.ContextVar("keras_actgrad_finite", default=False)


@contextlib.contextmanager
def assume_finite(enabled: bool = True) -> Iterator[None]:
    """Builds, in the block, moments for finite tensors only: no branch.

    The moments' branches on finiteness (the exact path for NaN and Inf)
    are left out; a pass built so must test its tensors' finiteness
    itself and take an exact pass when one is not (the JAX adapter does).
    """
    token = _FINITE.set(bool(enabled))
    try:
        yield
    finally:
        _FINITE.reset(token)


def finite_assumed() -> bool:
    """Whether the moments are being built for finite tensors only."""
    return _FINITE.get()


def float32(x: Tensor) -> Tensor:
    return keras.ops.cast(x, "float32")


def nan() -> Tensor:
    return keras.ops.convert_to_tensor(float("nan"), "float32")


def _static(shape: Sequence[int | None]) -> bool:
    return all(isinstance(d, int) for d in shape)


class Moments:
    """Lazily computed moments of one tapped tensor (each reduction done once).

    Written with `keras.ops`, so every backend can run it (JAX does). A
    backend may have a subclass with native ops where they are faster
    (`moments_tensorflow.py`, `moments_torch.py`; the backend dispatcher
    chooses): the same moments, in fewer passes over the tensors
    (TensorFlow) or without a Keras op dispatch each, where the pass runs
    eagerly (PyTorch).
    """

    def __init__(self, activation: Tensor, gradient: Tensor | None) -> None:
        self.a = float32(activation)
        self.g = None if gradient is None else float32(gradient)
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
            return nan()
        return self._get(name, getattr(self, name))

    def g_size(self) -> Tensor:
        return float32(keras.ops.size(self.g))

    def g_sum(self) -> Tensor:
        return keras.ops.sum(self.g)

    def g_abs_sum(self) -> Tensor:
        return keras.ops.sum(self._abs_g())

    def g_abs_max(self) -> Tensor:
        # NaN if any entry is NaN, as NumPy's `max` (XLA's max may skip NaN).
        ops = keras.ops
        largest = ops.max(self._abs_g())
        if finite_assumed():
            return largest
        return ops.cond(
            self.grad_finite(),
            lambda: largest,
            lambda: ops.where(ops.any(ops.isnan(self.g)), nan(), largest),
        )

    def g_nonzero(self) -> Tensor:
        # NaN counts as nonzero, as `g != 0` says.
        return keras.ops.sum(float32(keras.ops.not_equal(self.g, 0.0)))

    def g_sample_norm_mean(self) -> Tensor:
        return keras.ops.mean(self._sample_norms())

    def g_sample_norm_max(self) -> Tensor:
        return keras.ops.max(self._sample_norms())

    def g_nonfinite(self) -> Tensor:
        ops = keras.ops
        g = self.g
        if finite_assumed():
            return ops.zeros((), "float32")
        return ops.cond(
            self.grad_finite(),
            lambda: ops.zeros((), "float32"),
            lambda: ops.sum(float32(ops.logical_not(ops.isfinite(g)))),
        )

    # Activation moments.

    def a_mean(self) -> Tensor:
        return self._get("a_mean", lambda: keras.ops.mean(self.a))

    def a_size(self) -> Tensor:
        return float32(keras.ops.size(self.a))

    def a_std(self) -> Tensor:
        # One pass from the raw moments, E[a^2] - E[a]^2, where that is
        # accurate: while |mean| <= 2 std (ReLU and tanh outputs), E[a^2] is
        # at most 5 var, so its float32 rounding costs at most a few ulps of
        # the variance. Otherwise (e.g. sigmoid outputs bunched near 0.9, or
        # a non-finite activation) the corrected two-pass form (see
        # `_two_pass_std`). The same rule as the TensorFlow and PyTorch
        # moments'.
        ops = keras.ops
        mean = self.a_mean()
        variance = ops.mean(ops.square(self.a)) - ops.square(mean)
        return ops.cond(
            ops.square(mean) <= 4.0 * variance,
            lambda: ops.sqrt(variance),
            self._two_pass_std,
        )

    def _two_pass_std(self) -> Tensor:
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
            nonzero = float32(ops.not_equal(self.a, 0.0))
            rank = len(nonzero.shape)
            if rank <= 1:
                return ops.reshape(ops.sum(nonzero), (1,))
            return ops.sum(nonzero, axis=tuple(range(rank - 1)))

        return self._get("_unit_counts", compute)

    def a_nonzero(self) -> Tensor:
        return keras.ops.sum(self._unit_counts())

    def a_dead(self) -> Tensor:
        return keras.ops.sum(float32(keras.ops.equal(self._unit_counts(), 0.0)))

    def a_units(self) -> Tensor:
        return float32(keras.ops.size(self._unit_counts()))

    def histogram(
        self, which: str, bins: int, bounds: Sequence[Tensor] | None = None
    ) -> Tensor:
        """The histogram (see `histogram`) of the activation (`"a"`) or gradient.

        `bounds`, if given, is `(low, high, finite)`: the range to bin in
        and whether to take the all-finite path (those of a whole batch
        this tensor is a chunk of; see `histogram`).
        """
        if bounds is not None:
            low, high, finite = bounds
            tensor = self.a if which == "a" else self.g
            return histogram(tensor, bins, finite, (low, high))
        if which == "a":
            return histogram(self.a, bins, self.act_finite())
        return histogram(self.g, bins, self.grad_finite())

    def row(self, moments: Sequence[str]) -> Tensor:
        """The given moments as one float32 vector."""
        return keras.ops.stack([float32(self.moment(m)) for m in moments])

    def row_and_histogram(
        self, moments: Sequence[str], which: str, bins: int
    ) -> list[Tensor]:
        """`[row(moments)]` (if any moments), then `histogram(which, bins)`.

        One share of a probe (see `StatisticsReducer.reduce_activation`):
        a backend may compute both together, sharing passes over the tensor.
        """
        parts = [self.row(moments)] if moments else []
        if bins:
            parts.append(self.histogram(which, bins))
        return parts

    @staticmethod
    def weight_squares(
        grads: Sequence[Tensor | None],
        old: list[Tensor],
        new: Sequence[Tensor],
        scale: Tensor | None,
    ) -> Tensor:
        """Squared L2 norms of a training step's weight gradients and updates.

        Returns a `[3, n]` float32 tensor: the gradients' (divided by `scale`
        when given; NaN for a missing gradient), the updates' (`new - old`)
        and the weights' before the update (`old`). `old` may be overwritten
        (a backend's version may reuse the copies the step made of them).
        """
        ops = keras.ops
        grad_sq = []
        for g in grads:
            if g is None:
                grad_sq.append(nan())
                continue
            g = float32(g)
            grad_sq.append(_sq_norm(g if scale is None else g / scale))
        update_sq = [
            _sq_norm(float32(n) - float32(o)) for o, n in zip(old, new, strict=True)
        ]
        weight_sq = [_sq_norm(o) for o in old]
        return ops.stack(
            [ops.stack(grad_sq), ops.stack(update_sq), ops.stack(weight_sq)]
        )


def _sq_norm(tensor: Tensor) -> Tensor:
    tensor = float32(tensor)
    return keras.ops.sum(keras.ops.square(tensor))


def _count(index: Tensor, weights: Tensor | None, bins: int) -> Tensor:
    """Counts of `index` values in `[0, bins]`, the last folded into `bins - 1`.

    Index `bins` holds the entries equal to the maximum (the last bin is
    closed); folding it on the small count vector saves a clamping pass over
    the data. Returns float32 counts of shape `[bins]`.
    """
    ops = keras.ops
    if keras.backend.backend() == "jax" or in_xla():
        # jnp.bincount needs a static length; segment_sum has one (as
        # TensorFlow's XLA needs).
        data = ops.ones_like(index, "float32") if weights is None else weights
        counts = ops.segment_sum(data, index, num_segments=bins + 1)
    else:
        # TensorFlow and torch: bincount is several times faster than their
        # segment sums on CPU. `index <= bins`: the length is `bins + 1`.
        counts = ops.bincount(index, weights=weights, minlength=bins + 1)
        counts = ops.reshape(float32(counts), (bins + 1,))
    return ops.concatenate(
        [counts[: bins - 1], ops.reshape(counts[bins - 1] + counts[bins], (1,))]
    )


def histogram(
    x: Tensor,
    bins: int,
    finite: Tensor | None = None,
    bounds: Sequence[Tensor] | None = None,
) -> Tensor:
    """`[low, high, count_1, ..., count_bins]` of the finite entries of `x`.

    `bins` equal-width bins over `[low, high]` = the range of the finite
    entries; the last bin is closed on both sides. When every finite entry
    has the same value, all of them are counted in the first bin (the writer
    lays that case out as TensorBoard does). Without finite entries, `low` is
    +inf, `high` is -inf and all counts are 0. `finite`, a scalar boolean
    that is True only if every entry is finite, selects a faster path.

    `bounds = (low, high)`, if given, replaces the range of `x`'s finite
    entries: `x` is a chunk of a batch and `(low, high)` the batch's range
    (with `finite` the batch's), so the chunk's entries fall in exactly the
    bins the whole batch's would, and the chunks' counts add up to its
    counts. The index is clipped to the bins (a no-op for entries inside the
    range, which all are).
    """
    ops = keras.ops
    flat = ops.reshape(float32(x), (-1,))
    if bounds is None and finite_assumed():
        return _finite_histogram(flat, bins)
    if finite is None:
        finite = ops.isfinite(ops.sum(flat))
    if bounds is not None:
        return _bounded_histogram(flat, bins, finite, bounds)
    return ops.cond(
        finite,
        lambda: _finite_histogram(flat, bins),
        lambda: nonfinite_histogram(flat, bins),
    )


def _finite_histogram(flat: Tensor, bins: int) -> Tensor:
    """`histogram` of a flat tensor whose entries are all finite."""
    ops = keras.ops
    low, high = ops.min(flat), ops.max(flat)
    counts = _count(_bucket(flat, low, high, bins), None, bins)
    return ops.concatenate([ops.stack([low, high]), counts])


def nonfinite_histogram(
    x: Tensor, bins: int, bounds: Sequence[Tensor] | None = None
) -> Tensor:
    """`histogram` of a tensor with non-finite entries (they are not counted).

    The path `histogram` takes when `finite` is False, without the branch:
    for a backend's `histogram` whose own fast path is for finite tensors.
    """
    ops = keras.ops
    flat = ops.reshape(float32(x), (-1,))
    if bounds is not None:
        return _bounded_nonfinite_histogram(flat, bins, bounds)
    mask = ops.isfinite(flat)
    low = ops.min(ops.where(mask, flat, float("inf")))
    high = ops.max(ops.where(mask, flat, float("-inf")))
    safe_low = ops.where(ops.isfinite(low), low, 0.0)
    index = _bucket(ops.where(mask, flat, safe_low), safe_low, high, bins)
    counts = _count(index, float32(mask), bins)
    return ops.concatenate([ops.stack([low, high]), counts])


def _bucket(values: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """The bin index of each value in `[low, high]` (`bins` for the maximum).

    Values are >= low, so truncation is floor; the index is in [0, bins],
    `bins` only for the maximum (see `_count`).
    """
    ops = keras.ops
    width = high - low
    scale = ops.where(width > 0, bins / ops.where(width > 0, width, 1.0), 0.0)
    return ops.cast((values - low) * scale, "int32")


def _bounds(bounds: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    ops = keras.ops
    low = ops.convert_to_tensor(bounds[0], "float32")
    high = ops.convert_to_tensor(bounds[1], "float32")
    return low, high


def _bounded_histogram(
    flat: Tensor, bins: int, finite: Tensor, bounds: Sequence[Tensor]
) -> Tensor:
    """`histogram` of `flat` in a given range (see `histogram`'s `bounds`)."""
    ops = keras.ops

    def all_finite() -> Tensor:
        low, high = _bounds(bounds)
        index = ops.clip(_bucket(flat, low, high, bins), 0, bins)
        return ops.concatenate([ops.stack([low, high]), _count(index, None, bins)])

    return ops.cond(
        finite, all_finite, lambda: _bounded_nonfinite_histogram(flat, bins, bounds)
    )


def _bounded_nonfinite_histogram(
    flat: Tensor, bins: int, bounds: Sequence[Tensor]
) -> Tensor:
    ops = keras.ops
    low, high = _bounds(bounds)
    mask = ops.isfinite(flat)
    safe_low = ops.where(ops.isfinite(low), low, 0.0)
    index = _bucket(ops.where(mask, flat, safe_low), safe_low, high, bins)
    index = ops.clip(index, 0, bins)
    return ops.concatenate([ops.stack([low, high]), _count(index, float32(mask), bins)])
