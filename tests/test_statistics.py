"""On-device statistics against NumPy closed forms on the same batch."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad._backends.base import PassConfig  # noqa: E402
from keras_actgrad._engine import get_engine  # noqa: E402
from keras_actgrad._statistics.statistics import (  # noqa: E402
    STATISTICS,
    StatisticsReducer,
    check_statistics,
)
from keras_actgrad._tags import log_key  # noqa: E402

BINS = 30


def reference_statistics(activation: np.ndarray, gradient: np.ndarray | None) -> dict:
    """The README's definitions, written independently in NumPy (float64)."""
    a = activation.astype(np.float64)
    result = {
        "act_mean": a.mean(),
        "act_std": np.sqrt(((a - a.mean()) ** 2).mean()),
        "act_zero_fraction": np.count_nonzero(a == 0) / a.size,
    }
    units = a.reshape(-1, a.shape[-1])
    dead = [np.all(units[:, j] == 0) for j in range(units.shape[1])]
    result["dead_unit_fraction"] = float(np.mean(dead))
    if gradient is None:
        for name in STATISTICS:
            result.setdefault(name, np.nan)
        return result
    g = gradient.astype(np.float64)
    per_example = np.array([np.sqrt(np.sum(row**2)) for row in g])
    result.update(
        grad_norm=np.sqrt(np.sum(g**2)),
        grad_mean_abs=np.abs(g).mean(),
        grad_std=g.std(),
        grad_max_abs=np.abs(g).max(),
        grad_zero_fraction=np.count_nonzero(g == 0) / g.size,
        sample_grad_norm_mean=per_example.mean(),
        sample_grad_norm_max=per_example.max(),
        nonfinite=float(np.count_nonzero(~np.isfinite(g))),
    )
    return result


def reduce(
    model,
    x,
    y,
    *,
    loss="model",
    bins=BINS,
    weight_gradients=False,
    sample_weight=None,
    statistics=STATISTICS,
):
    engine = get_engine(model)
    reducer = StatisticsReducer(tuple(statistics), bins)
    config = PassConfig(loss, False, weight_gradients, reducer)
    result = engine.run(engine.prepare(x, y, sample_weight, loss), config)
    paths = [v.path for v in model.trainable_variables] if weight_gradients else []
    return reducer.unpack(result.outputs, result.reached, paths)


def conv_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras_actgrad.GradientProbe(name="conv_out")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(5, name="hidden")(h)
    # Before the ReLU, the gradient is exactly 0 wherever the unit is off.
    h = keras_actgrad.GradientProbe(name="pre_relu")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras_actgrad.GradientProbe(name="hidden_out")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    # Two hidden units that never fire: dead on every example.
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[:, :2] = 0.0
    bias[:2] = -1.0
    model.get_layer("hidden").set_weights([kernel, bias])
    return model


def test_statistics_match_numpy_definitions():
    model = conv_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(7, 3)).astype("float32")
    reduced = reduce(model, x, y)
    results = keras_actgrad.activation_gradients(model, x, y)
    assert sorted(reduced.statistics) == ["conv_out", "hidden_out", "pre_relu"]
    # The constructed zeros are there to be counted.
    assert reduced.statistics["pre_relu"]["grad_zero_fraction"] >= 2 / 5
    for probe, result in results.items():
        expected = reference_statistics(result.activation, result.gradient)
        for name in STATISTICS:
            np.testing.assert_allclose(
                reduced.statistics[probe][name],
                expected[name],
                rtol=2e-5,
                atol=1e-7,
                err_msg=f"{probe}/{name}",
            )
    # The constructed dead units are seen, and the closed form is exact.
    # (1 - 3/5 is 0.39999998 in float32 on some backends.)
    assert reduced.statistics["hidden_out"]["dead_unit_fraction"] >= 2 / 5 - 1e-6


def reused_probe_model():
    """A probe reached twice, a skip that bypasses a probe, a probe the loss
    does not reach; a batch and targets."""
    keras.utils.set_random_seed(5)
    shared = keras_actgrad.GradientProbe(name="shared")
    dense = keras.layers.Dense(6, activation="tanh", name="dense")
    inputs = keras.Input((6,))
    first = shared(dense(inputs))
    second = shared(dense(first))
    skipped = keras_actgrad.GradientProbe(name="skipped")(second)
    h = keras.layers.Add()([skipped, first])  # `first` bypasses "skipped"
    outputs = keras.layers.Dense(2, name="head")(h)
    cut = keras_actgrad.GradientProbe(name="cut")(
        keras.layers.Lambda(keras.ops.stop_gradient)(first)
    )
    model = keras.Model(inputs, [outputs, cut])
    model.compile("sgd", ["mse", None])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 6)).astype("float32")
    y = [rng.normal(size=(5, 2)).astype("float32"), np.zeros((5, 6), "float32")]
    return model, x, y


def test_probes_reduced_in_the_backward_pass_match_numpy():
    # The callback's reducer reduces each probe where its gradient appears in
    # the backward pass (TensorFlow, PyTorch; its activation share at the tap,
    # in the forward pass): a probe reached twice, a skip that bypasses a
    # probe, a probe the loss does not reach and weight gradients, against
    # the tensors `activation_gradients` returns whole.
    model, x, y = reused_probe_model()
    reduced = reduce(model, x, y, weight_gradients=True)
    results = keras_actgrad.activation_gradients(model, x, y)
    assert sorted(reduced.statistics) == sorted(results)
    assert results["cut"].gradient is None
    assert len(reduced.weight_grad_norms) == len(model.trainable_variables)
    for probe, result in results.items():
        expected = reference_statistics(result.activation, result.gradient)
        for name in STATISTICS:
            np.testing.assert_allclose(
                reduced.statistics[probe][name],
                expected[name],
                rtol=2e-5,
                atol=1e-7,
                err_msg=f"{probe}/{name}",
            )
        for kind, values in (
            ("gradient", result.gradient),
            ("activation", result.activation),
        ):
            counts = reduced.histograms[probe][kind][2]
            assert counts.sum() == (0 if values is None else values.size)


@pytest.mark.parametrize("bins", [0, 4])
@pytest.mark.parametrize(
    "statistics",
    [
        ("grad_norm", "sample_grad_norm_max"),  # gradient share only
        ("act_std", "dead_unit_fraction"),  # activation share only
        # Moments of both shares, interleaved in the output row.
        ("nonfinite", "act_mean", "grad_zero_fraction", "act_zero_fraction"),
    ],
)
def test_statistic_subsets_reduced_per_probe_match_numpy(statistics, bins):
    # Each probe's activation share and gradient share are reduced apart
    # (forward and backward pass) and laid out in the row `unpack` reads,
    # whichever shares the statistics need; the unreached probe ("cut")
    # still gives its activation statistics and histogram.
    model, x, y = reused_probe_model()
    reduced = reduce(model, x, y, bins=bins, statistics=statistics)
    results = keras_actgrad.activation_gradients(model, x, y)
    for probe, result in results.items():
        expected = reference_statistics(result.activation, result.gradient)
        assert sorted(reduced.statistics[probe]) == sorted(statistics)
        for name in statistics:
            np.testing.assert_allclose(
                reduced.statistics[probe][name],
                expected[name],
                rtol=2e-5,
                atol=1e-7,
                err_msg=f"{probe}/{name}",
            )
        if not bins:
            assert reduced.histograms == {}
            continue
        for kind, values in (
            ("gradient", result.gradient),
            ("activation", result.activation),
        ):
            low, high, counts = reduced.histograms[probe][kind]
            if values is None:
                assert counts.sum() == 0 and np.isnan(low), (probe, kind)
                continue
            assert (low, high) == pytest.approx((values.min(), values.max()))
            expected_counts, _ = np.histogram(
                values, bins=bins, range=(values.min(), values.max())
            )
            assert np.abs(counts - expected_counts).sum() <= 2, (probe, kind)


def test_histograms_match_numpy():
    model = conv_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(9, 3)).astype("float32")
    reduced = reduce(model, x, y)
    results = keras_actgrad.activation_gradients(model, x, y)
    for probe, result in results.items():
        for kind, values in (
            ("gradient", result.gradient),
            ("activation", result.activation),
        ):
            low, high, counts = reduced.histograms[probe][kind]
            assert low == pytest.approx(values.min())
            assert high == pytest.approx(values.max())
            expected, _ = np.histogram(
                values, bins=BINS, range=(values.min(), values.max())
            )
            assert counts.sum() == values.size
            # Values within rounding of a bin edge may fall either side.
            assert np.abs(counts - expected).sum() <= 2, (probe, kind)


def test_nonfinite_closed_form():
    # loss = sum(sqrt(|x|)): d loss / d x = sign(x) / (2 sqrt|x|), inf at 0.
    inputs = keras.Input((5,))
    h = keras_actgrad.GradientProbe(name="p")(inputs)
    outputs = keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t)))(h)
    model = keras.Model(inputs, outputs)
    x = np.array([[1.0, 0.0, 4.0, -9.0, 0.0], [0.25, 1.0, 0.0, 1.0, 1.0]], "float32")
    reduced = reduce(model, x, None, loss="sum", bins=4)
    assert reduced.statistics["p"]["nonfinite"] == 3.0
    assert reduced.statistics["p"]["act_zero_fraction"] == pytest.approx(0.3)
    low, high, counts = reduced.histograms["p"]["gradient"]
    finite = np.array([0.5, 0.25, -1 / 6, 1.0, 0.5, 0.5, 0.5])
    assert (low, high) == pytest.approx((finite.min(), finite.max()))
    assert counts.sum() == finite.size  # non-finite entries are left out


def check_nonfinite_counts(model, x, bins):
    """The probe pass of `model` (one probe "p", loss "sum") on an `x` that
    makes some gradient entries non-finite: the counting statistics follow
    NumPy's `!= 0` and `isfinite` (NaN is nonzero), the sums are not finite.
    Returns the reduced pass, the probe's `activation_gradients` result and
    the NumPy statistics."""
    reduced = reduce(model, x, None, loss="sum", bins=bins)
    result = keras_actgrad.activation_gradients(model, x, None, loss="sum")["p"]
    assert not np.isfinite(result.gradient).all()  # the case under test
    expected = reference_statistics(result.activation, result.gradient)
    for name in (
        "grad_zero_fraction",
        "nonfinite",
        "act_zero_fraction",
        "dead_unit_fraction",
    ):
        assert reduced.statistics["p"][name] == pytest.approx(expected[name]), name
    for name in ("grad_norm", "act_mean", "act_std"):
        assert not np.isfinite(reduced.statistics["p"][name]), name
    return reduced, result, expected


def test_counts_with_nonfinite_activations_and_gradients():
    # NaN and inf in the activation (the probe sees the input) and in the
    # gradient (sqrt(|x|) has an infinite slope at 0): the counting
    # statistics follow NumPy's `!= 0` and `isfinite`, NaN being nonzero.
    inputs = keras.Input((4,))
    h = keras_actgrad.GradientProbe(name="p")(inputs)
    outputs = keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t)))(h)
    model = keras.Model(inputs, outputs)
    x = np.array(
        [[np.nan, 0.0, 4.0, 0.0], [0.0, 0.0, -np.inf, 0.0], [1.0, 0.0, 0.0, 0.0]],
        "float32",
    )
    reduced, _, _ = check_nonfinite_counts(model, x, bins=0)
    # Column 1 and column 3 are zero in every example; column 0 holds a NaN.
    assert reduced.statistics["p"]["dead_unit_fraction"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("offset", [0.0, 0.9, 1e3])
def test_act_std_is_accurate_far_from_zero_mean(offset):
    # Entries bunched around `offset` (|mean| >> std for 0.9 and 1e3): a
    # variance from raw moments, E[a^2] - E[a]^2, would lose most digits.
    inputs = keras.Input((64,))
    h = keras_actgrad.GradientProbe(name="p")(inputs)
    outputs = keras.layers.Dense(1)(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    x = (offset + 1e-2 * rng.normal(size=(32, 64))).astype("float32")
    reduced = reduce(model, x, None, loss="sum", bins=0)
    expected = reference_statistics(x, None)
    for name in ("act_mean", "act_std"):
        np.testing.assert_allclose(
            reduced.statistics["p"][name], expected[name], rtol=2e-5, err_msg=name
        )


def test_probe_without_gradient_gives_nan():
    inputs = keras.Input((4,), dtype="int32")
    ids = keras_actgrad.GradientProbe(name="ids")(inputs)
    h = keras.layers.Embedding(10, 3)(ids)
    h = keras_actgrad.GradientProbe(name="embedded")(h)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    x = np.array([[1, 2, 0, 3], [4, 0, 0, 9]], "int32")
    y = np.ones((2, 1), "float32")
    with pytest.warns(UserWarning, match="not floating point"):
        reduced = reduce(model, x, y, bins=5)
    ids_stats = reduced.statistics["ids"]
    for name in STATISTICS:
        if name.startswith(("grad_", "sample_grad_")) or name == "nonfinite":
            assert np.isnan(ids_stats[name]), name
    assert ids_stats["act_zero_fraction"] == pytest.approx(3 / 8)
    assert ids_stats["dead_unit_fraction"] == pytest.approx(1 / 4)  # column 2
    assert reduced.histograms["ids"]["gradient"][2].sum() == 0
    assert np.isfinite(reduced.statistics["embedded"]["grad_norm"])


@pytest.mark.requires_tensorflow(
    reason="the reference is a tf.GradientTape; JAX and PyTorch weight gradients "
    "are compared with TensorFlow's in test_backends.py"
)
def test_weight_gradient_norms_match_tape():
    import tensorflow as tf

    model = conv_model()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(4, 3)).astype("float32")
    reduced = reduce(model, x, y, bins=0, weight_gradients=True)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    assert set(reduced.weight_grad_norms) == {v.path for v in model.trainable_variables}
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        np.testing.assert_allclose(
            reduced.weight_grad_norms[variable.path],
            np.linalg.norm(grad.numpy()),
            rtol=1e-5,
            err_msg=variable.path,
        )


def test_log_key_and_names():
    assert log_key("dense_probe", "grad_norm") == "actgrad/dense_probe/grad_norm"
    assert check_statistics(None, "statistics") == STATISTICS
    assert check_statistics(["act_mean", "act_mean"], "statistics") == ("act_mean",)
    with pytest.raises(ValueError, match=r"grad_nrom.*Accepted names.*grad_norm"):
        check_statistics(["grad_nrom"], "statistics")


def run_histogram(values, bins):
    from keras_actgrad._statistics.moments import histogram
    from keras_actgrad._statistics.statistics import _unpack_histogram

    out = keras.ops.convert_to_numpy(
        histogram(keras.ops.convert_to_tensor(values), bins)
    )
    return _unpack_histogram(out)


def test_histogram_edge_cases():
    # One value everywhere: one nonempty bin, range of width 0.
    low, high, counts = run_histogram(np.full((3, 4), 2.5, "float32"), 5)
    assert (low, high) == (2.5, 2.5) and counts.sum() == 12
    # Nothing finite: no counts, no range.
    low, high, counts = run_histogram(np.array([np.nan, np.inf], "float32"), 5)
    assert np.isnan(low) and np.isnan(high) and counts.sum() == 0
    # Mixed: non-finite entries are left out; the maximum is in the last bin.
    values = np.array([0.0, 1.0, np.nan, 2.0, 4.0, -np.inf], "float32")
    low, high, counts = run_histogram(values, 4)
    assert (low, high) == (0.0, 4.0)
    assert counts.tolist() == [1, 1, 1, 1]  # np.histogram([0, 1, 2, 4], 4)
    low, high, counts = run_histogram(np.array([0.0, 0.5, 3.0, 4.0], "float32"), 4)
    assert counts.tolist() == [2, 0, 0, 2]


def large_probe_model(nonlinearity):
    """A probe on a [600, 256] input: the TensorFlow moments reduce it in
    row blocks of 256, 256 and 88 rows (`row_blocks`)."""
    inputs = keras.Input((256,))
    h = keras_actgrad.GradientProbe(name="p")(inputs)
    h = keras.layers.Lambda(nonlinearity)(h)
    outputs = keras.layers.Dense(3, kernel_initializer="ones")(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_statistics_of_a_large_tensor_match_numpy(offset):
    # Large enough to be reduced in blocks on TensorFlow: every statistic
    # must still be the whole tensor's. Offset 1e3 with spread 1e-2 checks
    # the blocks' variances combine without cancellation; offset 0 gives
    # exact zeros in the gradient (ReLU) and a dead unit (column 7).
    rng = np.random.default_rng(4)
    x = (offset + (1e-2 if offset else 1.0) * rng.normal(size=(600, 256))).astype(
        "float32"
    )
    x[:, 7] = 0.0
    x[:300, 9] = 0.0  # zero in the first block only (and more): not dead
    model = large_probe_model(keras.ops.relu)
    reduced = reduce(model, x, None, loss="sum")
    result = keras_actgrad.activation_gradients(model, x, None, loss="sum")["p"]
    expected = reference_statistics(result.activation, result.gradient)
    for kind, values in (("gradient", result.gradient), ("activation", x)):
        low, high, counts = reduced.histograms["p"][kind]
        assert (low, high) == pytest.approx((values.min(), values.max()), rel=1e-5)
        if low == high:  # the gradient at offset 1e3: all ones
            assert counts.tolist() == [values.size] + [0] * (BINS - 1)
            continue
        reference, _ = np.histogram(values, bins=BINS, range=(low, high))
        assert counts.sum() == values.size
        # Values within rounding of a bin edge may fall either side.
        assert np.abs(counts - reference).sum() <= 4, kind
    if not offset:
        assert 0.4 < expected["grad_zero_fraction"] < 0.6  # the case under test
    assert expected["dead_unit_fraction"] == 1 / 256
    for name in STATISTICS:
        np.testing.assert_allclose(
            reduced.statistics["p"][name],
            expected[name],
            rtol=2e-5,
            atol=1e-7,
            err_msg=name,
        )


def test_counts_of_a_large_tensor_with_nonfinite_values():
    # NaN and inf in different blocks of the activation, infinite gradients
    # (sqrt(|x|) at 0) in others: counts and maxima are the whole tensor's.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 256)).astype("float32")
    x[:, 3] = 0.0
    x[595, 5] = np.nan  # in the last block: a plain maximum can skip it
    x[300, 6] = -np.inf
    x[590, 8] = 0.0
    model = large_probe_model(lambda t: keras.ops.sqrt(keras.ops.abs(t)))
    reduced, result, expected = check_nonfinite_counts(model, x, bins=BINS)
    assert reduced.statistics["p"]["nonfinite"] == 600 + 2  # column 3, x[590, 8]
    # The histograms count the finite entries only.
    for kind, values in (("gradient", result.gradient), ("activation", x)):
        finite = values[np.isfinite(values)]
        low, high, counts = reduced.histograms["p"][kind]
        assert (low, high) == pytest.approx((finite.min(), finite.max()), rel=1e-5)
        assert counts.sum() == finite.size, kind
    # NaN in one block, inf in the others: the maximum is NaN, as NumPy's.
    assert np.isnan(expected["grad_max_abs"])
    assert np.isnan(reduced.statistics["p"]["grad_max_abs"])


@pytest.mark.parametrize("value", [2.5, -3e30])
def test_histograms_of_a_large_constant_tensor(value):
    # Every entry equal (the activation; the gradient is all 3): one bin.
    x = np.full((600, 256), value, "float32")
    reduced = reduce(large_probe_model(lambda t: t), x, None, loss="sum")
    for kind, expected in (("activation", np.float32(value)), ("gradient", 3.0)):
        low, high, counts = reduced.histograms["p"][kind]
        assert low == high == expected, kind
        assert counts.tolist() == [x.size] + [0] * (BINS - 1), kind


@pytest.mark.requires_tensorflow(reason="row blocks are the TensorFlow moments'")
def test_row_blocks():
    import tensorflow as tf

    from keras_actgrad._statistics.moments_tensorflow import row_blocks

    assert row_blocks(tf.TensorShape([600, 256])) == [256, 256, 88]
    assert row_blocks(tf.TensorShape([512, 512])) == [128] * 4
    # At most 4 blocks: 4096 entries a row would give 32 blocks of 16 rows.
    assert row_blocks(tf.TensorShape([512, 8, 8, 64])) == [128] * 4
    # Every block but the last is a multiple of 16 rows (64-byte aligned).
    sizes = row_blocks(tf.TensorShape([100000, 8]))
    assert sum(sizes) == 100000 and len(sizes) <= 4
    assert all(n % 16 == 0 for n in sizes[:-1])
    for shape in ([64, 256], [16, 100000], [None, 512], [1 << 20]):
        assert row_blocks(tf.TensorShape(shape)) is None, shape


@pytest.mark.requires_tensorflow(reason="the TensorFlow moments' unit counts")
@pytest.mark.parametrize(
    "shape", [((1 << 20) - 1, 4), (1 << 20, 4), ((1 << 20) + 1, 4), (8, 16, 16, 5)]
)
def test_unit_counts_are_exact(shape):
    # The per-unit nonzero counts behind act_zero_fraction and
    # dead_unit_fraction, counted exactly on either side of the limit where
    # TensorFlow counts by a Euclidean norm (a count off by one would be
    # within the statistics tests' tolerance on a tensor this large).
    import tensorflow as tf

    from keras_actgrad._statistics.moments_tensorflow import _unit_counts

    rng = np.random.default_rng(len(shape) + shape[0])
    x = rng.normal(size=shape).astype("float32")
    x[..., 0][rng.random(shape[:-1]) < 0.3] = 0.0  # about 70% nonzero
    x[..., 1] = 0.0  # a dead unit...
    x[..., 2] = 0.0
    x.reshape(-1, shape[-1])[-1, 2] = -1e-30  # ...and one with one entry
    # The last unit stays all nonzero: the largest count.
    counts = _unit_counts(tf.constant(x)).numpy()
    expected = np.count_nonzero(x.reshape(-1, shape[-1]), axis=0)
    assert expected[-1] == np.prod(shape[:-1]) and expected[2] == 1
    assert counts.tolist() == expected.tolist()
