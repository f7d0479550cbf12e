"""The Custom Scalars layout written with a run: every probe on one chart."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import re  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad._layout import layout, probe_groups  # noqa: E402


def test_groups_small_model_one_chart():
    assert probe_groups(["a", "b", "c"]) == [("all probes", ["a", "b", "c"])]


def test_groups_big_model_by_block():
    probes = [
        f"transformer_layer_{b}/{part}"
        for b in range(24)
        for part in ("self_attention/query", "self_attention/value", "mlp")
    ]
    groups = probe_groups(probes)
    assert len(groups) == 24
    assert groups[3] == (
        "block transformer_layer_3",
        [
            "transformer_layer_3/self_attention/query",
            "transformer_layer_3/self_attention/value",
            "transformer_layer_3/mlp",
        ],
    )


def test_groups_without_blocks_in_runs_of_sixteen():
    probes = [f"dense_{i}_probe" for i in range(40)]
    groups = probe_groups(probes)
    assert [title for title, _ in groups] == [
        "probes 1-16",
        "probes 17-32",
        "probes 33-40",
    ]
    assert sum((members for _, members in groups), []) == probes


def test_chart_regexes_match_exactly_their_probes():
    probes = [
        f"block_{b}/dense@{k}" if k else f"block_{b}/dense"
        for b in range(9)
        for k in range(2)
    ]
    tags = [f"actgrad_batch.grad_norm/{p}" for p in probes] + [
        "actgrad_batch.grad_std/block_0/dense",
        "actgrad.grad_norm/block_0/dense",
    ]
    (category,) = layout(probes, ["grad_norm"], ["batch"]).category
    assert category.title == "actgrad_batch.grad_norm"
    assert not category.closed
    matched = []
    for chart, (_, members) in zip(category.chart, probe_groups(probes), strict=True):
        (regex,) = chart.multiline.tag
        found = [t for t in tags if re.search(regex, t)]
        assert found == [f"actgrad_batch.grad_norm/{p}" for p in members]
        matched += found
    assert len(matched) == len(probes)


@pytest.mark.one_backend("torch", reason="a tensorboard server")
def test_callback_writes_the_layout(tmp_path, tensorboard_server):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    h = keras_actgrad.GradientProbe(name="p0")(h)
    outputs = keras.layers.Dense(1)(h)
    h2 = keras_actgrad.GradientProbe(name="p1")(outputs)
    model = keras.Model(inputs, h2)
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 1), "float32")
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y),
        log_dir=str(tmp_path),
        statistics=["grad_norm", "act_std"],
        batch_freq=2,
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    accumulator = EventAccumulator(
        str(tmp_path / "actgrad"), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    events = accumulator.Tensors("custom_scalars__config__")
    last = layout_pb2.Layout.FromString(
        tensor_util.make_ndarray(events[-1].tensor_proto).item()
    )
    titles = [c.title for c in last.category]
    assert titles == [
        "actgrad_batch.grad_norm",
        "actgrad_batch.act_std",
        "actgrad.grad_norm",
        "actgrad.act_std",
    ]
    scalar_tags = [
        tag
        for tag in accumulator.Tags()["tensors"]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    ]
    for category in last.category:
        (chart,) = category.chart
        (regex,) = chart.multiline.tag
        found = sorted(t for t in scalar_tags if re.search(regex, t))
        assert found == [f"{category.title}/p0", f"{category.title}/p1"]
    # The layout is rewritten only when kinds or probes change.
    assert len(events) == 2
    # TensorBoard's own Custom Scalars plugin serves it.
    server = tensorboard_server(tmp_path)
    served = server.wait_for_json(
        "/data/plugin/custom_scalars/layout",
        lambda value: bool(value.get("category")),
        default={},
    )
    assert [c["title"] for c in served["category"]] == titles
