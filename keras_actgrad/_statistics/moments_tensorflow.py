"""The moments with TensorFlow ops: fewer passes, row blocks.

The same moments as `moments.Moments`, tested against the same NumPy
definitions; chosen by the backend dispatcher on TensorFlow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from keras_actgrad._statistics.moments import Moments, histogram

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
_MAX_BLOCKS = 16
# Moments combined across blocks by a sum and by a maximum; the means and
# `a_std`, `a_dead`, `a_units` are combined in `TensorFlowMoments.row`.
_ADDITIVE = frozenset(
    ["g_size", "g_sum", "g_sum_sq", "g_abs_sum", "g_nonzero", "g_nonfinite"]
    + ["a_size", "a_nonzero"]
)
_MAXIMA = frozenset(["g_abs_max", "g_sample_norm_max"])


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


def _blocks(tensor: Any) -> list[Any]:
    sizes = row_blocks(tensor.shape)
    return [tensor] if sizes is None else tf.split(tensor, sizes)


def _finite_histogram(tensor: Any, bins: int) -> Any:
    """`histogram` of a tensor whose entries are all finite, in row blocks.

    `tf.histogram_fixed_width` bins each block in one op (the portable
    version takes four); the blocks' counts are summed. Same layout and
    semantics as `histogram`: the range is the tensor's, the maximum is in
    the last bin, and when every entry is equal all are in the first bin.
    """
    blocks = _blocks(tensor)
    low = tf.reduce_min(tf.stack([tf.reduce_min(b) for b in blocks]))
    high = tf.reduce_max(tf.stack([tf.reduce_max(b) for b in blocks]))
    # All entries equal: any wider range puts them in the first bin (one
    # that stays wider than 0 in float32 when |low| is large).
    top = tf.where(high > low, high, low + tf.maximum(tf.abs(low), 1.0))
    value_range = tf.stack([low, top])
    counts = tf.add_n(
        [tf.histogram_fixed_width(b, value_range, nbins=bins) for b in blocks]
    )
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

    def _sample_norms(self) -> Any:
        def compute() -> Any:
            g = self.g
            rank = g.shape.rank
            if rank <= 1:
                return tf.reshape(tf.abs(g), [-1])
            return tf.math.reduce_euclidean_norm(g, axis=list(range(1, rank)))

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
        mean_sq = tf.square(tf.math.reduce_euclidean_norm(a)) / size
        variance = mean_sq - tf.square(mean)

        def two_pass(centred: Any) -> Any:
            centred_sq = tf.square(tf.math.reduce_euclidean_norm(centred)) / size
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

    def histogram(self, which: str, bins: int) -> Any:
        tensor, finite = (
            (self.a, self.act_finite())
            if which == "a"
            else (self.g, self.grad_finite())
        )
        return tf.cond(
            finite,
            lambda: _finite_histogram(tensor, bins),
            lambda: histogram(tensor, bins, finite),
        )

    def row(self, moments: Any) -> Any:
        """The moments as one vector, reduced in row blocks when large.

        Each block is reduced as a whole tensor (with its own exact paths
        for non-finite values) and the blocks' moments are combined: sums
        and maxima, means weighted by the blocks' sizes, the variance by
        Chan et al.'s pairwise formula (each block's centred sum of squares
        plus its size times its mean's squared distance to the overall
        mean), dead units from the summed per-unit nonzero counts.
        """
        sizes = None if self.g is None else row_blocks(self.a.shape)
        if sizes is None or self.g.shape != self.a.shape:
            return super().row(moments)
        blocks = [
            TensorFlowMoments(a, g)
            for a, g in zip(
                tf.split(self.a, sizes), tf.split(self.g, sizes), strict=True
            )
        ]
        # Block weights: rows (every row holds the same number of entries).
        weights = [float(n) for n in sizes]
        total = float(sum(sizes))

        def weighted_mean(name: str) -> Any:
            parts = [b.moment(name) * w for b, w in zip(blocks, weights, strict=True)]
            return tf.add_n(parts) / total

        def combine(name: str) -> Any:
            if name in _ADDITIVE:
                return tf.add_n([b.moment(name) for b in blocks])
            if name in _MAXIMA:
                # NaN if a block's is NaN: TensorFlow's max propagates NaN.
                return tf.reduce_max(tf.stack([b.moment(name) for b in blocks]))
            if name in ("g_sample_norm_mean", "a_mean"):
                return weighted_mean(name)
            if name == "a_std":
                mean = value("a_mean")
                spread = [
                    w * tf.square(b.moment("a_std"))
                    + w * tf.square(b.moment("a_mean") - mean)
                    for b, w in zip(blocks, weights, strict=True)
                ]
                return tf.sqrt(tf.add_n(spread) / total)
            if name in ("a_dead", "a_units"):
                counts = tf.add_n([b._unit_counts() for b in blocks])
                self._cache["_unit_counts"] = counts
                return super(TensorFlowMoments, self).moment(name)
            raise ValueError(f"Internal error: no block combination for {name!r}.")

        def value(name: str) -> Any:
            if name not in self._cache:
                self._cache[name] = combine(name)
            return self._cache[name]

        return tf.stack([tf.cast(value(name), tf.float32) for name in moments])
