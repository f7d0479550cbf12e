"""Every log key, TensorBoard tag and alert threshold: built and parsed here.

The `logs` keys (what `History`, `CSVLogger` and `EarlyStopping` see) are
`actgrad/<probe>/<statistic>` (on request, `log_statistics=`) and the
summary `actgrad/grad_norm_ratio`; weight-gradient keys are
`actgrad_weights/<variable path>/grad_norm`. Probe names may contain `/`
(layer paths), so a key is parsed from both ends: the prefix is its first
component, the statistic its last.

The TensorBoard tags put the statistic first, `<prefix>.<statistic>/<probe>`
(`actgrad.grad_norm/dense_probe`), with a prefix per event kind (`actgrad`
for epoch events, `actgrad_start`, `actgrad_batch`, `actgrad_step`), so that
TensorBoard, which groups cards by a tag's first path component, groups them
by statistic. The callback's own event files live in `<log_dir>/actgrad/`.
"""

from __future__ import annotations

import dataclasses
import re

LOG_PREFIX = "actgrad"
WEIGHTS_LOG_PREFIX = "actgrad_weights"

# Event kinds and their TensorBoard tag prefixes.
PREFIXES = {
    "epoch": "actgrad",
    "start": "actgrad_start",
    "batch": "actgrad_batch",
    "step": "actgrad_step",
}
WEIGHT_PREFIXES = {
    "epoch": "actgrad_weights",
    "start": "actgrad_weights_start",
    "batch": "actgrad_weights_batch",
    "step": "actgrad_weights_step",
}
KINDS = tuple(PREFIXES)
# The monitor's per-variable statistics (`<weights prefix>/<path>/<name>`)
# and its global gradient norm (`<prefix>/<GLOBAL_GRAD_NORM>`).
WEIGHT_STATISTICS = ("grad_norm", "update_norm", "update_ratio")
GLOBAL_GRAD_NORM = "global_grad_norm"

# The callback's event files: `<log_dir>/<EVENTS_SUBDIR>/`.
EVENTS_SUBDIR = "actgrad"
# Text summaries written beside the scalars (JSON): the probes in forward
# order, and the alert thresholds, so that the report uses them.
PROBE_ORDER_TAG = "actgrad/probe_order"
THRESHOLDS_TAG = "actgrad/alert_thresholds"
PROFILE_IMAGE_TAG = "actgrad/grad_norm_profile"
# The monitor's step events, packed: every value of a step in one float64
# tensor (plugin `actgrad`), first in its event, laid out by the JSON list
# of column names (the `to_numpy` keys) written with it whenever it changes.
STEP_VALUES_TAG = "actgrad_step/values"
STEP_COLUMNS_TAG = "actgrad_step/columns"

# Alert thresholds (the callback's defaults and the report's fallbacks): the
# ratio of a probe's `grad_norm` to that of the last probe in forward order.
VANISHING_RATIO = 1e-4
EXPLODING_RATIO = 1e4
# A probe is flagged for dead units when at least this fraction of its units
# (last axis) is zero for every example of the probe batch.
DEAD_UNIT_FRACTION = 0.5


# The summary on the progress bar: the first probe's `grad_norm` over the
# last probe's (the ratio the vanishing / exploding alerts compare).
RATIO_LOG_KEY = "actgrad/grad_norm_ratio"


def log_key(probe: str, statistic: str) -> str:
    """The `logs` key of a probe's statistic: `actgrad/<probe>/<statistic>`."""
    return f"{LOG_PREFIX}/{probe}/{statistic}"


def weight_log_key(path: str, statistic: str = "grad_norm") -> str:
    """The key of a weight statistic: `actgrad_weights/<path>/grad_norm`."""
    return f"{WEIGHTS_LOG_PREFIX}/{path}/{statistic}"


def summary_tag(kind: str, probe: str, name: str) -> str:
    """The TensorBoard tag of a probe's statistic or histogram at `kind` events.

    `<prefix>.<name>/<probe>`, e.g. `actgrad.grad_norm/dense_probe` or
    `actgrad_batch.gradient/dense_probe`: TensorBoard groups cards by a tag's
    first path component, so its dashboards group by statistic, with every
    probe of that statistic in one group.
    """
    return f"{PREFIXES[kind]}.{name}/{probe}"


def weight_summary_tag(kind: str, path: str, statistic: str = "grad_norm") -> str:
    """The TensorBoard tag of a weight statistic at `kind` events:
    `<weights prefix>.<statistic>/<variable path>`."""
    return f"{WEIGHT_PREFIXES[kind]}.{statistic}/{path}"


def global_summary_tag(kind: str) -> str:
    """The tag of the global gradient norm: `actgrad_step.global_grad_norm/model`."""
    return f"{PREFIXES[kind]}.{GLOBAL_GRAD_NORM}/model"


@dataclasses.dataclass(frozen=True)
class SummaryTag:
    """A parsed TensorBoard tag of the callback's (or the monitor's) events.

    Attributes:
        kind: The event kind (a key of `PREFIXES`: "epoch", "start", ...).
        target: `"probe"` (a probe's statistic or histogram) or `"weight"`
            (a weight gradient's norm).
        name: The statistic, `"gradient"` / `"activation"` for histograms,
            `"grad_norm"` for weights.
        key: The probe name or the variable path (either may contain `/`).
    """

    kind: str
    target: str
    name: str
    key: str


_TAG_PREFIXES = {prefix: (kind, "probe") for kind, prefix in PREFIXES.items()}
_TAG_PREFIXES.update(
    {prefix: (kind, "weight") for kind, prefix in WEIGHT_PREFIXES.items()}
)


def parse_summary_tag(tag: str) -> SummaryTag | None:
    """The inverse of `summary_tag` and `weight_summary_tag`, or None.

    Also reads the scheme of development versions before 0.1.0
    (`<prefix>/<probe>/<name>`), so that older logs still load.
    """
    head, _, rest = tag.partition("/")
    prefix, dot, name = head.partition(".")
    if dot:
        key = rest
    else:
        key, _, name = rest.rpartition("/")
    if prefix not in _TAG_PREFIXES or not key or not name:
        return None
    kind, target = _TAG_PREFIXES[prefix]
    return SummaryTag(kind, target, name, key)


def block_of(probe: str) -> str:
    """The block a probe belongs to, for grouping big models: the first path
    component of its name, without a repeated visit's `@N` suffix
    (`transformer_layer_3/self_attention/query` -> `transformer_layer_3`)."""
    return re.sub(r"@\d+$", "", probe.split("/", 1)[0])


def parse_key(key: str) -> tuple[str, str, str] | None:
    """`(prefix, probe or variable path, statistic)` of a `logs` key, or None.

    The inverse of `log_key` and `weight_log_key`; None for a string that is
    neither (TensorBoard tags are parsed by `parse_summary_tag`).
    """
    prefix, _, rest = key.partition("/")
    name, _, statistic = rest.rpartition("/")
    if prefix not in (LOG_PREFIX, WEIGHTS_LOG_PREFIX) or not name or not statistic:
        return None
    return prefix, name, statistic
