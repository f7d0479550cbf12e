"""`probe_batch_size` with histograms and weight gradients.

References: the unchunked pass (the same callback without
`probe_batch_size`), NumPy's histogram of the whole batch's arrays
(`activation_gradients`, itself checked against hand-split tapes in
test_engine.py), and the weight gradients of the test model in closed form
(NumPy, float64: softmax cross-entropy back through two Dense layers, plus
the L2 regularization's 2 l W), independent of any backend's autodiff.
"""

import keras
import numpy as np
import pytest
from test_chunks import build, data

import keras_actgrad
from keras_actgrad._engine import get_engine

BINS = 30


def callback_for(probe_data, **kwargs):
    kwargs.setdefault("histograms", True)
    kwargs.setdefault("histogram_bins", BINS)
    return keras_actgrad.ActivationGradientCallback(probe_data, **kwargs)


def reduced(model, probe_data, **kwargs):
    callback = callback_for(probe_data, **kwargs)
    callback.set_model(model)
    callback.on_train_begin()
    return callback._probe()


@pytest.mark.parametrize(
    ("loss", "size", "weighted"),
    [("model", 32, True), ("model", 7, False), ("sum", 32, False), ("mse", 50, True)],
)
def test_histograms_equal_the_whole_batch(loss, size, weighted):
    model = build()
    x, y, weights = data()
    if loss == "mse":
        y = keras.ops.convert_to_numpy(keras.ops.one_hot(y, 3))
    probe_data = (x, y, weights) if weighted else (x, y)
    whole = reduced(model, probe_data, loss=loss)
    chunked = reduced(model, probe_data, loss=loss, probe_batch_size=size)
    results = keras_actgrad.activation_gradients(
        model, x, y, loss=loss, sample_weight=weights if weighted else None
    )
    assert set(chunked.histograms) == set(results)
    for name, result in results.items():
        for kind, values in (
            ("gradient", result.gradient),
            ("activation", result.activation),
        ):
            low, high, counts = chunked.histograms[name][kind]
            whole_low, whole_high, whole_counts = whole.histograms[name][kind]
            where = f"{name} {kind}"
            # The counts of the whole batch, exactly.
            np.testing.assert_array_equal(counts, whole_counts, err_msg=where)
            assert counts.sum() == values.size, where
            np.testing.assert_allclose(
                [low, high], [whole_low, whole_high], rtol=1e-6, err_msg=where
            )
            np.testing.assert_allclose(
                [low, high], [values.min(), values.max()], rtol=1e-6, err_msg=where
            )
            if values.min() == values.max():
                # All equal (loss="sum" at the logits): all in the first bin.
                assert counts[0] == values.size, where
                continue
            expected, _ = np.histogram(
                values, bins=BINS, range=(values.min(), values.max())
            )
            # NumPy computes its edges its own way: an entry within rounding
            # of a bin edge may fall either side.
            assert np.abs(counts - expected).sum() <= 2, where
        for stat, value in whole.statistics[name].items():
            np.testing.assert_allclose(
                chunked.statistics[name][stat], value, rtol=2e-5, atol=1e-9
            )


@pytest.mark.filterwarnings("ignore")
def test_histograms_with_nonfinite_values():
    # An infinite input in the second chunk only: the whole batch's
    # histograms leave the non-finite entries out, over the finite range.
    model = build()
    x, y, _ = data()
    x[40, 3] = np.inf
    whole = reduced(model, (x, y), on_nonfinite="warn")
    chunked = reduced(model, (x, y), on_nonfinite="warn", probe_batch_size=32)
    results = keras_actgrad.activation_gradients(model, x, y)
    for name, result in results.items():
        for kind, values in (
            ("gradient", result.gradient),
            ("activation", result.activation),
        ):
            low, high, counts = chunked.histograms[name][kind]
            whole_low, whole_high, whole_counts = whole.histograms[name][kind]
            np.testing.assert_array_equal(counts, whole_counts, err_msg=name)
            finite = values[np.isfinite(values)]
            assert counts.sum() == finite.size
            if finite.size:
                np.testing.assert_allclose(
                    [low, high], [finite.min(), finite.max()], rtol=1e-6
                )


def test_histograms_compile_once_per_chunk_shape():
    # The range is an input of the compiled pass: new ranges at every event
    # reuse it. Chunks of 32, 32, 32 and 4 rows: two shapes, two passes
    # (ranges, then statistics).
    model = build()
    x, y, _ = data()
    callback = callback_for((x, y), loss="sum", probe_batch_size=32)
    callback.set_model(model)
    callback.on_train_begin()
    engine = get_engine(model)
    traces = engine.trace_count
    assert traces <= 4
    first = callback._probe().histograms
    model.get_layer("logits").set_weights(
        [w * 3.0 for w in model.get_layer("logits").get_weights()]
    )
    second = callback._probe().histograms
    assert engine.trace_count == traces
    # The ranges did move (loss="sum": the gradient at the hidden layer is
    # the logits kernel's row sums, scaled by 3).
    low, high, _ = second["hidden_probe"]["gradient"]
    np.testing.assert_allclose(
        [low, high], np.multiply(first["hidden_probe"]["gradient"][:2], 3), rtol=1e-5
    )


def build_regularized(l2, reduction="sum_over_batch_size"):
    model = build()
    for layer in (model.get_layer("hidden"), model.get_layer("logits")):
        if l2:
            layer.kernel.regularizer = keras.regularizers.L2(l2)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        ),
    )
    return model


def closed_form_norms(model, x, y, weights, l2, loss):
    """Weight-gradient norms of the test model, in NumPy (float64)."""
    hidden, logits_layer = model.get_layer("hidden"), model.get_layer("logits")
    w1, b1 = (np.float64(v) for v in hidden.get_weights())
    w2, b2 = (np.float64(v) for v in logits_layer.get_weights())
    x = np.float64(x)
    z = x @ w1 + b1
    h = np.maximum(z, 0.0)
    logits = h @ w2 + b2
    if loss == "sum":  # the sum of the outputs
        d = np.ones_like(logits)
    else:
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d = p
        d[np.arange(len(y)), y] -= 1.0
        d *= np.float64(weights)[:, None]
        if loss == "mean":
            d /= len(y)
    dz = (d @ w2.T) * (z > 0)
    grads = {
        hidden.kernel.path: x.T @ dz + 2 * l2 * w1,
        hidden.bias.path: dz.sum(axis=0),
        logits_layer.kernel.path: h.T @ d + 2 * l2 * w2,
        logits_layer.bias.path: d.sum(axis=0),
    }
    return {path: float(np.linalg.norm(g)) for path, g in grads.items()}


@pytest.mark.parametrize(
    ("loss", "size", "l2", "reduction"),
    [
        ("mean", 32, 0.05, "sum_over_batch_size"),  # regularization counted once
        ("mean", 7, 0.0, "sum_over_batch_size"),
        ("sum", 30, 0.05, "sum_over_batch_size"),  # loss="sum": no regularization
        ("summed", 32, 0.0, "sum"),
    ],
)
def test_weight_gradients_equal_the_whole_batch(loss, size, l2, reduction):
    model = build_regularized(l2, reduction)
    x, y, weights = data()
    spec = "sum" if loss == "sum" else "model"
    kwargs = {"loss": spec, "histograms": False, "weight_gradients": True}
    whole = reduced(model, (x, y, weights), **kwargs)
    chunked = reduced(model, (x, y, weights), probe_batch_size=size, **kwargs)
    expected = closed_form_norms(
        model, x, y, weights, l2 if spec == "model" else 0, loss
    )
    assert set(chunked.weight_grad_norms) == set(expected)
    for path, norm in expected.items():
        # float32, summed in another order: a few ulps of the norm.
        assert chunked.weight_grad_norms[path] == pytest.approx(norm, rel=2e-5), path
        assert chunked.weight_grad_norms[path] == pytest.approx(
            whole.weight_grad_norms[path], rel=2e-5
        ), path


def test_weight_gradients_with_histograms_in_fit():
    # Both at once, in `fit`; the training is the one without the callback.
    x, y, weights = data()
    plain = build_regularized(0.05)
    plain.fit(x, y, epochs=2, batch_size=50, shuffle=False, verbose=0)
    model = build_regularized(0.05)
    callback = callback_for((x, y, weights), weight_gradients=True, probe_batch_size=32)
    model.fit(
        x, y, epochs=2, batch_size=50, shuffle=False, verbose=0, callbacks=[callback]
    )
    for got, expected in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert len(callback.events) == 2
    for event in callback.events:
        assert set(event["histograms"]) == {"hidden_probe", "logits_probe"}
        counts = event["histograms"]["hidden_probe"]["activation"][2]
        assert counts.sum() == x.shape[0] * 32
        assert len(event["weight_grad_norms"]) == 4
        assert all(np.isfinite(list(event["weight_grad_norms"].values())))


def test_summed_loss_with_weight_regularization_is_refused():
    model = build_regularized(0.05, reduction="sum")
    x, y, _ = data()
    callback = callback_for(
        (x, y), histograms=False, weight_gradients=True, probe_batch_size=32
    )
    callback.set_model(model)
    with pytest.raises(ValueError, match="regularization.*Received: loss reduction"):
        callback.on_train_begin()


def test_summed_loss_with_activity_regularization_is_refused():
    # Keras averages an activity regularizer over the batch: under a summed
    # loss a chunk's share of it is N / n too large (weights and probes
    # upstream of the layer). A Keras loss passed as `loss=` leaves it out.
    model = build(activity_regularizer=keras.regularizers.L2(0.1))
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        ),
    )
    x, y, _ = data()
    with pytest.raises(ValueError, match="activity regularizers on \\['hidden'\\]"):
        keras_actgrad.activation_gradients(model, x, y, probe_batch_size=32)
    callback = callback_for((x, y), probe_batch_size=32)
    callback.set_model(model)
    with pytest.raises(ValueError, match="activity regularizers"):
        callback.on_train_begin()
    summed = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    whole = reduced(model, (x, y), loss=summed, weight_gradients=True)
    chunked = reduced(
        model, (x, y), loss=summed, weight_gradients=True, probe_batch_size=32
    )
    for path, norm in whole.weight_grad_norms.items():
        assert chunked.weight_grad_norms[path] == pytest.approx(norm, rel=2e-5)
