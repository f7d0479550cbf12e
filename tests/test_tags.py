"""The TensorBoard tag scheme: one builder, one parser, both schemes read."""

from __future__ import annotations

import pytest

from keras_actgrad._tags import (
    SummaryTag,
    block_of,
    parse_summary_tag,
    summary_tag,
    weight_summary_tag,
)

PROBES = [
    "dense_probe",
    "transformer_layer_0/self_attention/query",
    "transformer_layer_0/self_attention/query@1",
    "block.1/conv",
]


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("kind", ["epoch", "start", "batch", "step"])
def test_probe_tags_round_trip(kind, probe):
    for name in ("grad_norm", "sample_grad_norm_max", "gradient", "activation"):
        tag = summary_tag(kind, probe, name)
        assert parse_summary_tag(tag) == SummaryTag(kind, "probe", name, probe)


def test_tags_group_by_statistic():
    # TensorBoard groups cards by the first path component of a tag.
    assert summary_tag("epoch", "a/b", "grad_norm") == "actgrad.grad_norm/a/b"
    assert summary_tag("batch", "p", "gradient") == "actgrad_batch.gradient/p"
    assert summary_tag("step", "p", "grad_std") == "actgrad_step.grad_std/p"
    assert weight_summary_tag("epoch", "dense/kernel") == (
        "actgrad_weights.grad_norm/dense/kernel"
    )
    assert parse_summary_tag("actgrad_weights_step.grad_norm/dense/kernel") == (
        SummaryTag("step", "weight", "grad_norm", "dense/kernel")
    )


def test_tags_of_version_0_1_still_parse():
    assert parse_summary_tag("actgrad/a/b/grad_norm") == SummaryTag(
        "epoch", "probe", "grad_norm", "a/b"
    )
    assert parse_summary_tag("actgrad_start/p/gradient") == SummaryTag(
        "start", "probe", "gradient", "p"
    )
    assert parse_summary_tag("actgrad_weights_batch/d/kernel/grad_norm") == (
        SummaryTag("batch", "weight", "grad_norm", "d/kernel")
    )


@pytest.mark.parametrize(
    "tag",
    [
        "actgrad/probe_order",
        "actgrad/alert_thresholds",
        "epoch_loss",
        "actgrad.grad_norm/",
        "other.grad_norm/p",
        "custom_scalars__config__",
    ],
)
def test_other_tags_are_not_parsed(tag):
    assert parse_summary_tag(tag) is None


def test_block_of():
    assert block_of("transformer_layer_3/self_attention/query") == (
        "transformer_layer_3"
    )
    assert block_of("dense@1") == "dense"
    assert block_of("dense_probe") == "dense_probe"
