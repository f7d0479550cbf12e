"""The Custom Scalars layout written with a run: every probe on one chart.

TensorBoard's Scalars dashboard draws one card per tag. The Custom Scalars
dashboard (`tensorboard.plugins.custom_scalar`) draws the charts of a layout
that the run stores as a summary: here, per event kind and statistic, one
multi-line chart with every probe on it (a regex on the scalar tags), so
that the probes are side by side, the question being where the gradient
vanishes. Big models get one chart per block instead (probes grouped by
the first component of their name, e.g. `transformer_layer_3` for
`transformer_layer_3/self_attention/query`), or per run of `BLOCK_SIZE`
probes in forward order when the names have no blocks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from keras_actgrad import _tags

# Up to this many probes share one chart; more are split by block.
BLOCK_SIZE = 16
# Statistics whose category is open when the dashboard loads.
OPEN_STATISTICS = ("grad_norm",)


def probe_groups(probes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`[(title, probes)]`: one group of all probes, or blocks for big models."""
    probes = list(probes)
    if len(probes) <= BLOCK_SIZE:
        return [("all probes", probes)]
    blocks: dict[str, list[str]] = {}
    for probe in probes:
        blocks.setdefault(_tags.block_of(probe), []).append(probe)
    biggest = max(len(members) for members in blocks.values())
    if 1 < len(blocks) < len(probes) and biggest <= 4 * BLOCK_SIZE:
        return [(f"block {name}", members) for name, members in blocks.items()]
    return [
        (
            f"probes {start + 1}-{min(start + BLOCK_SIZE, len(probes))}",
            probes[start : start + BLOCK_SIZE],
        )
        for start in range(0, len(probes), BLOCK_SIZE)
    ]


def layout(
    probes: Sequence[str], statistics: Sequence[str], kinds: Sequence[str]
) -> Any:
    """A `tensorboard.plugins.custom_scalar.layout_pb2.Layout` of the probes.

    One category per kind and statistic (titled like the tags,
    `actgrad.grad_norm`), holding the charts of `probe_groups`; each chart's
    regex matches exactly its probes' scalar tags.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    groups = probe_groups(probes)
    categories = []
    for kind in kinds:
        for statistic in statistics:
            charts = []
            for title, members in groups:
                prefix = re.escape(_tags.summary_tag(kind, "", statistic))
                names = "|".join(re.escape(probe) for probe in members)
                regex = f"^{prefix}.+" if len(groups) == 1 else f"^{prefix}(?:{names})$"
                charts.append(
                    layout_pb2.Chart(
                        title=f"{statistic}: {title}",
                        multiline=layout_pb2.MultilineChartContent(tag=[regex]),
                    )
                )
            categories.append(
                layout_pb2.Category(
                    title=_tags.summary_tag(kind, "", statistic).rstrip("/"),
                    chart=charts,
                    closed=statistic not in OPEN_STATISTICS,
                )
            )
    return layout_pb2.Layout(category=categories)
