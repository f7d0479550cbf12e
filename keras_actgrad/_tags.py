"""Every log key, TensorBoard tag and alert threshold: built and parsed here.

The `logs` keys (what `History`, `CSVLogger` and `EarlyStopping` see) are
`actgrad/<probe>/<statistic>`; weight-gradient keys are
`actgrad_weights/<variable path>/grad_norm`. The TensorBoard scalar tags
carry a prefix per event kind (`actgrad` for epoch events, `actgrad_start`,
`actgrad_batch`); the callback's own event files live in
`<log_dir>/actgrad/`. Probe names may contain `/` (layer paths), so a key is
parsed from both ends: the prefix is its first component, the statistic its
last.
"""

from __future__ import annotations

LOG_PREFIX = "actgrad"
WEIGHTS_LOG_PREFIX = "actgrad_weights"

# Event kinds and their TensorBoard tag prefixes.
PREFIXES = {"epoch": "actgrad", "start": "actgrad_start", "batch": "actgrad_batch"}
WEIGHT_PREFIXES = {
    "epoch": "actgrad_weights",
    "start": "actgrad_weights_start",
    "batch": "actgrad_weights_batch",
}
KINDS = tuple(PREFIXES)
# `GradientMonitor` events (kind "step", step = global training step).
PREFIXES["step"] = "actgrad_step"
WEIGHT_PREFIXES["step"] = "actgrad_weights_step"
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

# Alert thresholds (the callback's defaults and the report's fallbacks): the
# ratio of a probe's `grad_norm` to that of the last probe in forward order.
VANISHING_RATIO = 1e-4
EXPLODING_RATIO = 1e4
# A probe is flagged for dead units when at least this fraction of its units
# (last axis) is zero for every example of the probe batch.
DEAD_UNIT_FRACTION = 0.5


def log_key(probe: str, statistic: str) -> str:
    """The `logs` key of a probe's statistic: `actgrad/<probe>/<statistic>`."""
    return f"{LOG_PREFIX}/{probe}/{statistic}"


def weight_log_key(path: str, statistic: str = "grad_norm") -> str:
    """The key of a weight statistic: `actgrad_weights/<path>/grad_norm`."""
    return f"{WEIGHTS_LOG_PREFIX}/{path}/{statistic}"


def summary_tag(kind: str, probe: str, name: str) -> str:
    """The TensorBoard tag of a probe's statistic or histogram at `kind` events."""
    return f"{PREFIXES[kind]}/{probe}/{name}"


def weight_summary_tag(kind: str, path: str, statistic: str = "grad_norm") -> str:
    """The TensorBoard tag of a weight statistic at `kind` events."""
    return f"{WEIGHT_PREFIXES[kind]}/{path}/{statistic}"


def global_summary_tag(kind: str) -> str:
    """The tag of the global gradient norm: `actgrad_step/global_grad_norm`."""
    return f"{PREFIXES[kind]}/{GLOBAL_GRAD_NORM}"


def parse_key(key: str) -> tuple[str, str, str] | None:
    """`(prefix, probe or variable path, statistic)` of a key or tag, or None.

    The inverse of `log_key`, `weight_log_key`, `summary_tag` and
    `weight_summary_tag`; None for a string that is none of them.
    """
    prefix, _, rest = key.partition("/")
    name, _, statistic = rest.rpartition("/")
    known = set(PREFIXES.values()) | set(WEIGHT_PREFIXES.values())
    if prefix not in known or not name or not statistic:
        return None
    return prefix, name, statistic
