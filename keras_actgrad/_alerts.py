"""The alert rules, one home for the callback and the report.

- vanishing / exploding: a probe's `grad_norm` divided by the `grad_norm`
  of the last probe in forward order (nearest the loss) that has a finite
  one is below `vanishing` / above `exploding`;
- non-finite: a NaN or Inf entry in a probe's gradient;
- dead units: at least a fraction of a probe's units is zero for every
  example.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from keras_actgrad._tags import DEAD_UNIT_FRACTION


def reference_norm(norms: Sequence[float]) -> float:
    """The `grad_norm` ratios' denominator: the last finite norm, or NaN."""
    for norm in reversed(norms):
        if math.isfinite(norm):
            return float(norm)
    return math.nan


def ratio_alert(ratio: float, vanishing: float, exploding: float) -> str | None:
    """`"vanishing"`, `"exploding"` or None for a `grad_norm` ratio."""
    if ratio < vanishing:
        return "vanishing"
    if ratio > exploding:
        return "exploding"
    return None


def first_to_last(
    norms: Sequence[tuple[str, float]],
) -> tuple[str, float, str, float, float] | None:
    """`(first, its norm, last, its norm, first / last)` over finite norms.

    `norms` are `(probe, grad_norm)` pairs in forward order; probes without
    a finite `grad_norm` are left out. None when fewer than two remain or
    the last norm is not positive.
    """
    finite = [(probe, norm) for probe, norm in norms if math.isfinite(norm)]
    if len(finite) < 2 or finite[-1][1] <= 0:
        return None
    (first, first_norm), (last, last_norm) = finite[0], finite[-1]
    return first, first_norm, last, last_norm, first_norm / last_norm


def nonfinite(count: float) -> bool:
    """Whether a probe's `nonfinite` count says its gradient had NaN or Inf."""
    return count > 0


def dead_units(fraction: float, threshold: float = DEAD_UNIT_FRACTION) -> bool:
    return fraction >= threshold


class Alerts:
    """Checks the alert rules on each recorded event and warns (or raises).

    Each kind of alert warns once per run (`reset` starts a new run).

    Args:
        on_nonfinite: `"warn"`, `"raise"` (a `FloatingPointError`) or
            `"stop"` (warn and set `model.stop_training`).
        vanishing: the vanishing threshold of the first-to-last ratio.
        exploding: the exploding threshold of that ratio.
        source: the name of the callback, for the messages.
    """

    def __init__(self, on_nonfinite: str, vanishing: float, exploding: float) -> None:
        self.on_nonfinite = on_nonfinite
        self.vanishing = vanishing
        self.exploding = exploding
        self._alerted: set[str] = set()

    def reset(self) -> None:
        self._alerted = set()

    def check(
        self,
        model: Any,
        where: str,
        probe_order: Sequence[str],
        statistics: dict[str, dict[str, float]],
    ) -> None:
        """Checks one event's statistics (`{probe: {statistic: value}}`)."""
        model_name = model.name
        for probe in probe_order:
            count = statistics.get(probe, {}).get("nonfinite", math.nan)
            if not nonfinite(count):
                continue
            message = (
                f"Non-finite gradients (NaN or Inf) {where} in model '{model_name}': "
                f"first in forward order at probe '{probe}' ({int(count)} "
                "entries of the batch's gradient). The loss or an "
                "activation overflowed or divided by zero; lower the learning "
                "rate, clip gradients, or check the inputs."
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message)
            if self.on_nonfinite == "stop":
                model.stop_training = True
                message += " Training stops (on_nonfinite='stop')."
            self._warn_once("nonfinite", message)
            break
        norms = [
            (probe, statistics[probe]["grad_norm"])
            for probe in probe_order
            if probe in statistics and "grad_norm" in statistics[probe]
        ]
        found = first_to_last(norms)
        if found is None:
            return
        first, first_norm, last, last_norm, ratio = found
        alert = ratio_alert(ratio, self.vanishing, self.exploding)
        if alert == "vanishing":
            self._warn_once(
                "vanishing",
                f"Vanishing gradient {where} in model '{model_name}': grad_norm at "
                f"the first probe '{first}' ({first_norm:.3g}) is {ratio:.3g} times "
                f"that at the last probe '{last}' ({last_norm:.3g}), below "
                f"vanishing_threshold={self.vanishing:g}. Consider ReLU-"
                "like activations, normalization, residual connections or a "
                "different initialization.",
            )
        elif alert == "exploding":
            self._warn_once(
                "exploding",
                f"Exploding gradient {where} in model '{model_name}': grad_norm at "
                f"the first probe '{first}' ({first_norm:.3g}) is {ratio:.3g} times "
                f"that at the last probe '{last}' ({last_norm:.3g}), above "
                f"exploding_threshold={self.exploding:g}. Consider "
                "normalization, gradient clipping or a smaller initialization.",
            )

    def _warn_once(self, alert: str, message: str) -> None:
        if alert in self._alerted:
            return
        self._alerted.add(alert)
        # Several JAX processes decide alike (the same global statistics);
        # process 0 alone warns.
        from keras_actgrad._backends import processes

        if processes().index() == 0:
            warnings.warn(message, stacklevel=4)
