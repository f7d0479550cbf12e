"""Per-probe statistics, reduced on the device in float32.

The names here are the public vocabulary of the logs: every log key is built
by `log_key`, nowhere else.
"""

from __future__ import annotations

STATISTICS: tuple[str, ...] = (
    "grad_norm",
    "grad_mean_abs",
    "grad_std",
    "grad_max_abs",
    "grad_zero_fraction",
    "act_mean",
    "act_std",
    "act_zero_fraction",
    "dead_unit_fraction",
    "sample_grad_norm_mean",
    "sample_grad_norm_max",
    "nonfinite",
)

LOG_PREFIX = "actgrad"


def log_key(probe: str, statistic: str) -> str:
    """The `logs` key (and TensorBoard scalar tag) of a probe's statistic."""
    return f"{LOG_PREFIX}/{probe}/{statistic}"
