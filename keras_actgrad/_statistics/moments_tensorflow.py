"""The moments with TensorFlow ops: fewer passes, row blocks.

The same moments as `moments.Moments`, tested against the same NumPy
definitions; chosen by the backend dispatcher on TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from keras_actgrad._statistics.moments import Moments, in_xla, nonfinite_histogram

# Row blocks: a reduction over one probe's tensor is split into blocks of at
# most this many entries. TensorFlow (Eigen) runs an op over a 512 x 512
# tensor on all intra-op threads, paying their synchronisation on every op;
# an op over a block of 64K entries runs on one thread, and the blocks of all
# probes run side by side on the inter-op threads (measured on the reference
# MLP, 2 cores: the statistics of a 512 x 512 probe from 0.65 to 0.55 ms
# standalone; an event with 10 probes from 1.27-1.29x to 1.22-1.26x the
# event with 1). The blocks alias the tensor (no copy): they are split
# along the first axis, in multiples of `_BLOCK_ROWS_MULTIPLE` rows, which
# keeps every block 64-byte aligned (TensorFlow copies unaligned splits).
_BLOCK_ENTRIES = 1 << 16
_BLOCK_ROWS_MULTIPLE = 16
# At most 4 blocks a probe (enough to keep a few inter-op threads busy): each
# block adds its ops to the traced graph, which TensorFlow keeps for the
# whole run; with 24 probes of 2048 x 1024, 16 blocks made a probe event's
# peak 573 MB above the warm process, 4 blocks 465 MB, none 335 MB (a
# training step: 240-290 MB; benchmarks/bench_memory.py, indicative).
_MAX_BLOCKS = 4


def _euclidean_norm(x: Any, axis: Any = None) -> Any:
    """`tf.math.reduce_euclidean_norm`, or its XLA-compilable form under XLA."""
    if in_xla():
        return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis))
    return tf.math.reduce_euclidean_norm(x, axis=axis)


def _histogram_counts(block: Any, value_range: Any, bins: int) -> Any:
    """`tf.histogram_fixed_width`, or its XLA-compilable form under XLA.

    Under XLA: the same bin of each entry (`tf.histogram_fixed_width_bins`,
    clipped to the bins as `histogram_fixed_width` does), counted by
    a segment sum (a bincount's length is not a compile-time constant).
    """
    if not in_xla():
        return tf.histogram_fixed_width(block, value_range, nbins=bins)
    flat = tf.reshape(block, [-1])
    index = tf.histogram_fixed_width_bins(flat, value_range, nbins=bins)
    ones = tf.ones_like(index)
    return tf.math.unsorted_segment_sum(ones, index, num_segments=bins)


def row_blocks(shape: tf.TensorShape) -> list[int] | None:
    """The row counts of the blocks a tensor of `shape` is reduced in.

    None (one block: the whole tensor) unless the shape is static, of rank 2
    or more, and has more than one block's worth of entries.
    """
    if shape.rank is None or shape.rank < 2 or not shape.is_fully_defined():
        return None
    rows = int(shape[0])
    per_row = int(np.prod(shape[1:]))
    if per_row == 0 or rows * per_row <= _BLOCK_ENTRIES:
        return None
    step = max(_BLOCK_ENTRIES // per_row, 1)
    step = max(step // _BLOCK_ROWS_MULTIPLE, 1) * _BLOCK_ROWS_MULTIPLE
    step = max(step, -(-rows // _MAX_BLOCKS))
    step = -(-step // _BLOCK_ROWS_MULTIPLE) * _BLOCK_ROWS_MULTIPLE
    if step >= rows:
        return None
    sizes = [step] * (rows // step)
    if rows % step:
        sizes.append(rows % step)
    return sizes


def _blocks(tensor: Any, blocked: bool = True) -> list[Any]:
    sizes = row_blocks(tensor.shape) if blocked else None
    return [tensor] if sizes is None else tf.split(tensor, sizes)


def _finite_histogram(
    tensor: Any, bins: int, bounds: Any = None, blocked: bool = True
) -> Any:
    """`histogram` of a tensor whose entries are all finite, in row blocks.

    `tf.histogram_fixed_width` bins each block in one op (the portable
    version takes four); the blocks' counts are summed. Same layout and
    semantics as `histogram`: the range is the tensor's, the maximum is in
    the last bin, and when every entry is equal all are in the first bin.
    `bounds = (low, high)` bins in that range instead (a chunk of a batch,
    in the batch's range; see `histogram`). `blocked=False`: the whole
    tensor as one block.
    """
    blocks = _blocks(tensor, blocked)
    if bounds is not None:
        low, high = bounds[0], bounds[1]
    elif len(blocks) == 1:
        low, high = tf.reduce_min(tensor), tf.reduce_max(tensor)
    else:
        low = tf.reduce_min(tf.stack([tf.reduce_min(b) for b in blocks]))
        high = tf.reduce_max(tf.stack([tf.reduce_max(b) for b in blocks]))
    return _blocks_histogram(blocks, low, high, bins)


def _blocks_histogram(blocks: list[Any], low: Any, high: Any, bins: int) -> Any:
    """`histogram`'s layout for finite row blocks in the range [low, high]."""
    # All entries equal: any wider range puts them in the first bin (one
    # that stays wider than 0 in float32 when |low| is large).
    top = tf.where(high > low, high, low + tf.maximum(tf.abs(low), 1.0))
    value_range = tf.stack([low, top])
    parts = [_histogram_counts(b, value_range, bins) for b in blocks]
    counts = tf.add_n(parts) if len(parts) > 1 else parts[0]
    return tf.concat([tf.stack([low, high]), tf.cast(counts, tf.float32)], 0)


class TensorFlowMoments(Moments):
    """The statistics' moments with TensorFlow ops, for fewer passes.

    Each op of a TensorFlow graph is one pass over the tensor on CPU, so
    this uses the ops that fold two steps into one: `reduce_euclidean_norm`
    (no squared copy) and, while the tensor is finite, `sign(|x|)` for the
    nonzero counts, reusing `|g|` (one pass instead of a comparison and a
    cast; `sign(NaN)` is NaN, so non-finite tensors take the exact path).
    The same moments as `Moments`, tested against the same definitions.
    """

    g: Any  # only read where the probe has a gradient
    # Large tensors reduced in row blocks (see `row_blocks`).
    blocked = True

    def _sample_norms(self) -> Any:
        def compute() -> Any:
            g = self.g
            rank = g.shape.rank
            if rank <= 1:
                return tf.reshape(tf.abs(g), [-1])
            return _euclidean_norm(g, axis=list(range(1, rank)))

        return self._get("_sample_norms", compute)

    def g_sum_sq(self) -> Any:
        return self._get(
            "g_sum_sq", lambda: tf.reduce_sum(tf.square(self._sample_norms()))
        )

    def g_nonzero(self) -> Any:
        return tf.cond(
            self.grad_finite(),
            lambda: tf.reduce_sum(tf.sign(self._abs_g())),
            lambda: tf.reduce_sum(tf.cast(tf.not_equal(self.g, 0.0), tf.float32)),
        )

    def a_std(self) -> Any:
        # One pass from the raw moments, E[a^2] - E[a]^2, where that is
        # accurate: while |mean| <= 2 std (ReLU and tanh outputs), E[a^2] is
        # at most 5 var, so its float32 rounding error costs at most a few
        # ulps of the variance. Otherwise (e.g. sigmoid outputs bunched near
        # 0.9) the corrected two-pass form of `Moments.a_std`.
        a = self.a
        mean = self.a_mean()
        size = tf.cast(tf.size(a), tf.float32)
        mean_sq = tf.square(_euclidean_norm(a)) / size
        variance = mean_sq - tf.square(mean)

        def two_pass(centred: Any) -> Any:
            centred_sq = tf.square(_euclidean_norm(centred)) / size
            shift = tf.reduce_sum(centred) / size
            return tf.sqrt(tf.maximum(centred_sq - tf.square(shift), 0.0))

        return tf.cond(
            tf.square(mean) <= 4.0 * variance,
            lambda: tf.sqrt(variance),
            lambda: two_pass(a - mean),
        )

    def _unit_counts(self) -> Any:
        def compute() -> Any:
            a = self.a
            if a.shape.rank <= 1:
                a = tf.reshape(a, [-1, 1])
            axes = list(range(a.shape.rank - 1))
            return tf.cond(
                self.act_finite(),
                lambda: tf.reduce_sum(tf.sign(tf.abs(a)), axis=axes),
                lambda: tf.reduce_sum(
                    tf.cast(tf.not_equal(a, 0.0), tf.float32), axis=axes
                ),
            )

        return self._get("_unit_counts", compute)

    def histogram(self, which: str, bins: int, bounds: Any = None) -> Any:
        tensor = self.a if which == "a" else self.g
        if bounds is None:
            limits = None
            finite = self.act_finite() if which == "a" else self.grad_finite()
        else:  # a chunk of a batch: the batch's range and finiteness
            limits, finite = (bounds[0], bounds[1]), bounds[2]
        # The non-finite branch without `histogram`'s own `tf.cond` on
        # `finite` (known False there): every op of the branch not taken is
        # still visited by the executor, once per event.
        return tf.cond(
            finite,
            lambda: _finite_histogram(tensor, bins, limits, self.blocked),
            lambda: nonfinite_histogram(tensor, bins, limits),
        )

    @staticmethod
    def weight_squares(
        grads: Sequence[Any], old: list[Any], new: Sequence[Any], scale: Any
    ) -> Any:
        """As `Moments.weight_squares`, one `reduce_euclidean_norm` a norm.

        One pass over each tensor (a square and a sum are two, with a
        squared copy between them).
        """

        def sq_norm(x: Any) -> Any:
            return tf.square(_euclidean_norm(tf.cast(x, tf.float32)))

        grad_sq = []
        for g in grads:
            if g is None:
                grad_sq.append(tf.constant(np.nan, tf.float32))
                continue
            g = tf.cast(g, tf.float32)
            grad_sq.append(sq_norm(g if scale is None else g / scale))
        update_sq = [
            sq_norm(tf.cast(n, tf.float32) - tf.cast(o, tf.float32))
            for o, n in zip(old, new, strict=True)
        ]
        weight_sq = [sq_norm(o) for o in old]
        return tf.stack([tf.stack(grad_sq), tf.stack(update_sq), tf.stack(weight_sq)])

    def row(self, moments: Any) -> Any:
        """The moments as one vector: one branch a probe, row blocks when large.

        The moments are reduced without a branch, assuming finite tensors;
        one `tf.cond` per probe takes the whole-tensor exact path when a
        tensor holds a non-finite value. Each `tf.cond` adds two functions
        to the graph and, lowered, ops that the executor visits on every
        event, taken or not: on small tensors they cost more than the
        reductions (DenseNet121: 242 probes, most of 16-64K entries), and
        per block, hundreds of probes made the traced graph take gigabytes
        (see `_FiniteBlocks`). Large tensors are reduced in row blocks.
        """
        wants_g = any(name.startswith("g_") for name in moments)
        if not _blockable(self.a, self.g if wants_g else self.a):
            return super().row(moments)
        sizes = row_blocks(self.a.shape) if self.blocked else None

        def split(tensor: Any) -> list[Any]:
            return [tensor] if sizes is None else tf.split(tensor, sizes)

        a_blocks = split(self.a)
        # (`self.g is self.a`: the gradient standing in for the activation.)
        same = wants_g and self.g is self.a
        g_blocks = a_blocks if same else split(self.g) if wants_g else []
        blocks = _FiniteBlocks(a_blocks, g_blocks)
        fast = tf.stack([blocks.moment(name) for name in moments])
        checks = []
        if wants_g:
            checks.append(tf.math.is_finite(blocks.moment("g_sum_sq")))
        if any(name.startswith("a_") for name in moments):
            checks.append(tf.math.is_finite(blocks.moment("a_sum")))
        if not checks:
            return fast
        finite = checks[0] if len(checks) == 1 else tf.logical_and(*checks)
        return tf.cond(
            finite,
            lambda: fast,
            lambda: Moments.row(_ExactMoments(self.a, self.g), moments),
        )

    def row_and_histogram(
        self, moments: Sequence[str], which: str, bins: int
    ) -> list[Any]:
        """One share's moments and histogram behind one branch on finiteness.

        `row` then `histogram` test the tensor's finiteness twice, each with
        its own reduction (the histogram's on the whole tensor, next to
        `row`'s on its blocks) and `tf.cond`. Here one test (`row`'s) and
        one `tf.cond` serve both; the histogram's range is reduced on the
        row blocks, next to the moments, and gives `g_abs_max`
        (`max(-min, max)` of a finite gradient) without its own pass. The
        histogram bins are counted in the finite branch only.
        """
        tensor = self.a if which == "a" else self.g
        other = "g_" if which == "a" else "a_"
        if (
            not bins
            or any(name.startswith(other) for name in moments)
            or not _blockable(tensor, tensor)
        ):
            return super().row_and_histogram(moments, which, bins)
        blocks = _blocks(tensor, self.blocked)
        reduced = (
            _FiniteBlocks(blocks, []) if which == "a" else _FiniteBlocks([], blocks)
        )
        low = reduced.combine([tf.reduce_min(b) for b in blocks], tf.reduce_min)
        high = reduced.combine([tf.reduce_max(b) for b in blocks], tf.reduce_max)
        if which == "g":
            reduced.provide("g_abs_max", tf.maximum(-low, high))
        fast = [tf.stack([reduced.moment(name) for name in moments])] if moments else []
        # A sum is finite only if every entry is (or it overflows, which
        # only costs the exact path): the one the row needs, if any.
        if which == "a":
            check = "a_sum"
        else:
            check = next(
                (m for m in ("g_sum_sq", "g_sum", "g_abs_sum") if m in moments),
                "g_sum",
            )
        finite = tf.math.is_finite(reduced.moment(check))

        def finite_branch() -> Any:
            histogram = _blocks_histogram(blocks, low, high, bins)
            return tf.concat([*fast, histogram], 0)

        def exact_branch() -> Any:
            exact = _ExactMoments(self.a, self.g)
            rows = [Moments.row(exact, moments)] if moments else []
            return tf.concat([*rows, nonfinite_histogram(tensor, bins)], 0)

        vector = tf.cond(finite, finite_branch, exact_branch)
        if not moments:
            return [vector]
        return [vector[: len(moments)], vector[len(moments) :]]


def _blockable(a: Any, g: Any) -> bool:
    """Whether `_FiniteBlocks` can reduce the probe: static shapes, rank >= 2."""
    shape = a.shape
    return (
        g is not None
        and shape.rank is not None
        and shape.rank >= 2
        and shape.is_fully_defined()
        and g.shape == shape
    )


class TensorFlowStepMoments(TensorFlowMoments):
    """`TensorFlowMoments` for the monitored training step: no row blocks.

    In a probe pass the blocks of all probes run side by side on the
    threads; in a training step the backward pass's own matrix products
    keep them busy, and the blocks' extra ops cost more than they save:
    every step with all statistics, 1.16x `fit` without the monitor
    against 1.18-1.19x with blocks (reference MLP, three runs of 50-100
    paired steps).
    """

    blocked = False


class _ExactMoments(TensorFlowMoments):
    """`TensorFlowMoments` without their branches on finiteness.

    For `row`'s non-finite branch: the same values as `TensorFlowMoments`
    for finite and non-finite tensors alike (sums of 0 / 1 counts are
    exact), in fewer ops, which the executor visits even when the branch
    is not taken.
    """

    def g_abs_max(self) -> Any:
        largest = tf.reduce_max(self._abs_g())
        return tf.where(tf.reduce_any(tf.math.is_nan(self.g)), np.nan, largest)

    def g_nonzero(self) -> Any:
        return tf.reduce_sum(tf.cast(tf.not_equal(self.g, 0.0), tf.float32))

    def g_nonfinite(self) -> Any:
        nonfinite = tf.logical_not(tf.math.is_finite(self.g))
        return tf.reduce_sum(tf.cast(nonfinite, tf.float32))

    def _unit_counts(self) -> Any:
        def compute() -> Any:
            a = self.a
            if a.shape.rank <= 1:
                a = tf.reshape(a, [-1, 1])
            axes = list(range(a.shape.rank - 1))
            return tf.reduce_sum(tf.cast(tf.not_equal(a, 0.0), tf.float32), axis=axes)

        return self._get("_unit_counts", compute)


# `_unit_counts` counts by a Euclidean norm while a unit has at most this
# many entries: its count is then exact after rounding (see there).
_NORM_COUNT_LIMIT = 1 << 20


def _unit_counts(block: Any) -> Any:
    """The nonzero entries of each unit (last axis) of a finite block.

    `sign(x)^2` is 1 where x != 0, else 0, so the squared Euclidean norm of
    `sign(x)` over a unit's entries is its count: two passes over the block
    (`sign`, the norm) where a sum of `sign(|x|)` takes three. The sum of
    squares of 0 / 1 values is exact in float32 up to 2^24; the norm's
    square root and its square then round it by at most a few 1e-7
    relatively, under 0.5 for a count up to 2^20, so `round` gives it back
    exactly. Units with more entries are counted by the sum.
    """
    shape = block.shape
    axes = list(range(shape.rank - 1))
    if int(np.prod(shape[:-1])) > _NORM_COUNT_LIMIT:
        return tf.reduce_sum(tf.sign(tf.abs(block)), axis=axes)
    norms = _euclidean_norm(tf.sign(block), axis=axes)
    return tf.round(tf.square(norms))


class _FiniteBlocks:
    """The moments of a probe from its row blocks, for finite tensors only.

    Sums and counts add over the blocks, maxima take the maximum, the
    per-example gradient norms are concatenated, the per-unit nonzero
    counts add. No branch: the graph grows by a few ops per block, where
    per-block `TensorFlowMoments` (five `tf.cond` each) made TensorFlow's
    trace of a 24-probe event take 1.7 GB more than the pass itself
    (benchmarks/bench_memory.py). `a_std` is one pass from the raw moments
    while |mean| <= 2 std (see `TensorFlowMoments.a_std`), else the
    corrected two-pass form over the blocks: one `tf.cond` per probe.
    """

    def __init__(self, a_blocks: list[Any], g_blocks: list[Any]) -> None:
        self.a_blocks = a_blocks
        self.g_blocks = g_blocks
        self.a_entries = float(sum(int(np.prod(b.shape)) for b in a_blocks))
        self.g_entries = float(sum(int(np.prod(b.shape)) for b in g_blocks))
        self._cache: dict[str, Any] = {}

    def _sum(self, parts: list[Any]) -> Any:
        return tf.add_n(parts) if len(parts) > 1 else parts[0]

    def combine(self, parts: list[Any], reduce: Any) -> Any:
        """The blocks' partial results `parts` reduced by `reduce` (max, min)."""
        return reduce(tf.stack(parts)) if len(parts) > 1 else parts[0]

    def provide(self, name: str, value: Any) -> None:
        """Sets moment `name` to `value`, computed elsewhere (not recomputed)."""
        self._cache[name] = tf.cast(value, tf.float32)

    def _abs_g(self) -> list[Any]:
        if "_abs_g" not in self._cache:
            self._cache["_abs_g"] = [tf.abs(b) for b in self.g_blocks]
        return self._cache["_abs_g"]  # type: ignore[no-any-return]

    def _sample_norms(self) -> Any:
        return self.moment("_sample_norms")

    def _compute(self, name: str) -> Any:
        if name == "_sample_norms":
            rank = self.g_blocks[0].shape.rank
            norms = [
                _euclidean_norm(b, axis=list(range(1, rank))) for b in self.g_blocks
            ]
            return tf.concat(norms, 0) if len(norms) > 1 else norms[0]
        if name == "g_size":
            return tf.constant(self.g_entries, tf.float32)
        if name == "a_size":
            return tf.constant(self.a_entries, tf.float32)
        if name == "g_sum":
            return self._sum([tf.reduce_sum(b) for b in self.g_blocks])
        if name == "g_sum_sq":
            return tf.reduce_sum(tf.square(self._sample_norms()))
        if name == "g_abs_sum":
            return self._sum([tf.reduce_sum(b) for b in self._abs_g()])
        if name == "g_abs_max":
            return self.combine(
                [tf.reduce_max(b) for b in self._abs_g()], tf.reduce_max
            )
        if name == "g_nonzero":
            return self._sum([tf.reduce_sum(tf.sign(b)) for b in self._abs_g()])
        if name == "g_nonfinite":
            return tf.constant(0.0, tf.float32)
        if name == "g_sample_norm_mean":
            return tf.reduce_mean(self._sample_norms())
        if name == "g_sample_norm_max":
            return tf.reduce_max(self._sample_norms())
        if name == "a_sum":
            return self._sum([tf.reduce_sum(b) for b in self.a_blocks])
        if name == "a_mean":
            return self.moment("a_sum") / self.a_entries
        if name == "a_std":
            return self._a_std()
        if name == "_unit_counts":
            return self._sum([_unit_counts(b) for b in self.a_blocks])
        if name == "a_nonzero":
            return tf.reduce_sum(self.moment("_unit_counts"))
        if name == "a_dead":
            counts = self.moment("_unit_counts")
            return tf.reduce_sum(tf.cast(tf.equal(counts, 0.0), tf.float32))
        if name == "a_units":
            return tf.constant(float(self.a_blocks[0].shape[-1]), tf.float32)
        raise ValueError(f"Internal error: no block moment {name!r}.")

    def _a_std(self) -> Any:
        size = self.a_entries
        mean = self.moment("a_mean")
        squares = self._sum([tf.square(_euclidean_norm(b)) for b in self.a_blocks])
        variance = squares / size - tf.square(mean)

        def two_pass() -> Any:
            centred = [b - mean for b in self.a_blocks]
            centred_sq = self._sum([tf.square(_euclidean_norm(c)) for c in centred])
            shift = self._sum([tf.reduce_sum(c) for c in centred]) / size
            return tf.sqrt(tf.maximum(centred_sq / size - tf.square(shift), 0.0))

        return tf.cond(
            tf.square(mean) <= 4.0 * variance,
            lambda: tf.sqrt(tf.maximum(variance, 0.0)),
            two_pass,
        )

    def moment(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = tf.cast(self._compute(name), tf.float32)
        return self._cache[name]
