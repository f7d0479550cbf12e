"""The alert rules, one home for the callback and the report.

- vanishing / exploding: a probe's `grad_norm` divided by the `grad_norm`
  of the last probe in forward order (nearest the loss) that has a finite
  one is below `vanishing` / above `exploding`;
- non-finite: a NaN or Inf entry in a probe's gradient; in a training step
  (`GradientMonitor`) also a non-finite loss, weight gradient or weight
  after the update (`StepChecks`), except on a step that
  `LossScaleOptimizer` skips by design;
- dead units: at least a fraction of a probe's units is zero for every
  example.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

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


@dataclasses.dataclass
class StepChecks:
    """What a training step found not finite (host side).

    Attributes:
        loss: whether `logs["loss"]` (the mean over the epoch so far) is
            not finite.
        gradients: paths of the variables whose gradient has a NaN or Inf.
        weights: paths of the variables holding a NaN or Inf after the update.
        scale: the loss scale of the gradients the optimizer received (NaN:
            none).
    """

    loss: bool
    gradients: list[str]
    weights: list[str]
    scale: float

    @classmethod
    def unpack(cls, tail: np.ndarray, paths: Sequence[str]) -> StepChecks:
        """From the step vector's last `2 * len(paths) + 2` values."""
        n = len(paths)
        flags = np.asarray(tail[: 2 * n]).reshape(2, n) > 0
        return cls(
            loss=bool(tail[2 * n] > 0),
            gradients=[p for p, bad in zip(paths, flags[0], strict=True) if bad],
            weights=[p for p, bad in zip(paths, flags[1], strict=True) if bad],
            scale=float(tail[2 * n + 1]),
        )


def _first(kind: str, names: Sequence[str]) -> str:
    more = len(names) - 1
    return f"{kind} '{names[0]}'" + (f" (and {more} more)" if more else "")


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
        # The first monitored step of the current run of steps that
        # `LossScaleOptimizer` skipped (None: the last step was not skipped).
        self._skipped_since: int | None = None

    def reset(self) -> None:
        self._alerted = set()
        self._skipped_since = None

    def check_step(
        self,
        model: Any,
        step: int,
        checks: StepChecks,
        probe_order: Sequence[str],
        statistics: dict[str, dict[str, float]],
        loss_scaling: bool = False,
        note: str = "",
    ) -> bool:
        """Checks a training step's loss, gradients and updated weights.

        One alert names the first thing found not finite: the loss, a
        probe's gradient (forward order), a variable's gradient, a
        variable's weights after the update (variable order).

        Under `LossScaleOptimizer` (`loss_scaling`), a step whose gradients
        are not finite while its loss and weights are is one the optimizer
        skips by design (it lowers the scale and retries): no alert, unless
        the loss scale was already 1 or less (then the scaling is not the
        cause). Returns True for such a skipped step, whose other alerts
        should be left out (its probe gradients overflowed too).
        """
        counts = [
            (probe, statistics.get(probe, {}).get("nonfinite", math.nan))
            for probe in probe_order
        ]
        probes = [(probe, count) for probe, count in counts if nonfinite(count)]
        since = self._skipped_since
        skipped = (
            loss_scaling
            and bool(checks.gradients or probes)
            and not checks.loss
            and not checks.weights
        )
        self._skipped_since = (step if since is None else since) if skipped else None
        if skipped and not checks.scale <= 1:
            return True
        where = f"at training step {step} in model '{model.name}'"
        causes = []
        if checks.loss:
            title = f"Non-finite loss (NaN or Inf) {where}"
            causes.append("the loss (`logs['loss']`, its mean over the epoch so far)")
        elif probes or checks.gradients:
            title = f"Non-finite gradients (NaN or Inf) {where}"
        elif checks.weights:
            title = f"Non-finite weights (NaN or Inf) after the update {where}"
        else:
            return False
        if probes:
            probe, count = probes[0]
            causes.append(
                f"the gradient at probe '{probe}' ({int(count)} entries of the "
                "batch's gradient; first in forward order)"
            )
        if checks.gradients:
            causes.append(_first("the gradient of variable", checks.gradients))
        if checks.weights:
            causes.append(_first("the weights of variable", checks.weights))
            causes[-1] += " after the update"
        message = f"{title}: " + "; ".join(causes) + "."
        if skipped:
            message += (
                f" LossScaleOptimizer skips a step whose gradients are not "
                f"finite, but these are not finite at loss scale "
                f"{checks.scale:g}, so the scaling is not the cause (it has "
                f"skipped every monitored step since step {self._skipped_since})."
            )
        if checks.loss:
            message += (
                " A NaN or Inf in a batch (inputs, labels, sample weights) or "
                "an output that overflowed makes the loss non-finite: check "
                "the data, lower the learning rate, or clip gradients."
            )
        elif probes or checks.gradients:
            message += (
                " A NaN or Inf in the batch, an operation whose derivative is "
                "not finite (sqrt or log at 0, a division by a tiny value) or "
                "an overflow in the backward pass: check the data, lower the "
                "learning rate, or clip gradients."
            )
        else:
            message += (
                " The optimizer's update overflowed (a learning rate or a "
                "step too large): lower the learning rate or clip gradients."
            )
        self._fire(model, message + note)
        return False

    def check_weights(
        self,
        model: Any,
        where: str,
        gradients: Sequence[str],
        weights: Sequence[str],
    ) -> None:
        """Checks a probe pass's weight gradients and the weights themselves.

        `gradients`: the variables (that have a gradient) whose gradient in
        the probe pass is not finite; `weights`: the variables holding a NaN
        or Inf. Both in the model's order.
        """
        if not gradients and not weights:
            return
        causes = []
        if weights:
            title = f"Non-finite weights (NaN or Inf) {where} in model '{model.name}'"
            causes.append(_first("variable", weights) + " holds NaN or Inf")
        else:
            title = (
                f"Non-finite weight gradients (NaN or Inf) {where} in model "
                f"'{model.name}'"
            )
        if gradients:
            causes.append(
                _first("the gradient of variable", gradients) + " on the probe batch"
            )
        self._fire(
            model,
            f"{title}: "
            + "; ".join(causes)
            + ". A NaN or Inf in the data, an overflow, or an operation whose "
            "derivative is not finite (sqrt or log at 0): check the data, "
            "lower the learning rate, or clip gradients. `GradientMonitor` "
            "names the training step where it started.",
        )

    def _fire(self, model: Any, message: str) -> None:
        """Follows `on_nonfinite` with a non-finite alert's message."""
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        if self.on_nonfinite == "stop":
            model.stop_training = True
            message += " Training stops (on_nonfinite='stop')."
        self._warn_once("nonfinite", message)

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
