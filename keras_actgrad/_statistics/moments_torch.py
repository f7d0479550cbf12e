"""The moments with native torch ops, one kernel each where possible.

The same moments as `moments.Moments`, tested against the same NumPy
definitions; chosen by the backend dispatcher on PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from keras_actgrad._statistics.moments import Moments

# Moments computed together by `TorchMoments.row` (see `_gradient_group`,
# `_activation_group`).
_ABS_GROUP = frozenset({"g_abs_sum", "g_abs_max", "g_nonzero"})
_UNIT_GROUP = frozenset({"a_nonzero", "a_dead"})


def _float32(x: Any) -> Any:
    return torch.as_tensor(x, dtype=torch.float32)


class TorchMoments(Moments):
    """The statistics' moments with torch ops, one kernel each where possible.

    The pass runs eagerly, so each `keras.ops` call would cost a dispatch
    (argument conversion, dtype checks) on top of its kernel; these are the
    same moments as `Moments`'s, in native torch. Kernels are chosen for CPU
    speed: comparisons against zero (`!=`, `count_nonzero`) are several
    times slower on ReLU outputs than `abs().sign()`, which is used while
    the tensor is finite (`sign(NaN)` is NaN; then `!=` counts exactly).

    `row` computes the moments it is asked for in groups that share one
    scratch tensor (the shape of the probe's tensors), written in place:
    `|g|`, then its signs; `a - mean(a)` (only where `a_std` needs the
    two-pass form), then `|a|` and its signs. Every
    moment is the same kernel's result as when asked for alone; a probe
    allocates one temporary instead of one per elementwise op (on CPU, each
    fresh allocation of a large tensor costs page faults).
    """

    g: Any  # only read where the probe has a gradient

    def __init__(self, activation: Any, gradient: Any) -> None:
        self.a = _float32(activation)
        self.g = None if gradient is None else _float32(gradient)
        self._cache: dict[str, Any] = {}
        self._scratch: Any = None

    def _buffer(self, like: Any) -> Any:
        """A scratch tensor of `like`'s shape, reused by the groups."""
        if self._scratch is None or self._scratch.shape != like.shape:
            self._scratch = torch.empty(
                like.shape, dtype=torch.float32, device=like.device
            )
        return self._scratch

    def _sample_norms(self) -> Any:
        def compute() -> Any:
            g = self.g
            if g.dim() <= 1:
                return g.abs().reshape(-1)
            return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)

        return self._get("_sample_norms", compute)

    def g_sum_sq(self) -> Any:
        return self._get("g_sum_sq", lambda: self._sample_norms().square().sum())

    def grad_finite(self) -> Any:
        return self._get("_g_finite", lambda: torch.isfinite(self.g_sum_sq()))

    def act_finite(self) -> Any:
        return self._get("_a_finite", lambda: torch.isfinite(self.a_mean()))

    def _finite(self, which: str) -> bool:
        """Whether every entry of `g` (or `a`) is finite, read on the host.

        Once both sums are there (as in `row`), both flags are read at once.
        """
        key = f"_{which}_finite_host"
        if key not in self._cache:
            both = self.g is not None and {"g_sum_sq", "a_mean"} <= self._cache.keys()
            if both and bool(torch.isfinite(self.g_sum_sq() + self.a_mean())):
                self._cache["_g_finite_host"] = self._cache["_a_finite_host"] = True
            elif which == "g":
                self._cache[key] = bool(self.grad_finite())
            else:
                self._cache[key] = bool(self.act_finite())
        return bool(self._cache[key])

    def g_size(self) -> Any:
        return float(self.g.numel())

    def g_sum(self) -> Any:
        return self.g.sum()

    def g_abs_sum(self) -> Any:
        return self._abs_g().sum()

    def g_abs_max(self) -> Any:
        return self._abs_g().amax()

    def _abs_g(self) -> Any:
        return self._get("_abs_g", lambda: self.g.abs())

    def g_nonzero(self) -> Any:
        if self._finite("g"):
            return self._abs_g().sign().sum()
        return (self.g != 0).sum().float()

    def g_sample_norm_mean(self) -> Any:
        return self._sample_norms().mean()

    def g_sample_norm_max(self) -> Any:
        return self._sample_norms().amax()

    def g_nonfinite(self) -> Any:
        if self._finite("g"):
            return 0.0
        return (~torch.isfinite(self.g)).sum().float()

    def a_mean(self) -> Any:
        return self._get("a_mean", lambda: self.a.mean())

    def a_size(self) -> Any:
        return float(self.a.numel())

    def a_std(self) -> Any:
        return self._std(lambda: self.a - self.a_mean())

    def _std(self, centre: Any) -> Any:
        """`a_std`: one pass from the raw moments where that is accurate.

        As `TensorFlowMoments.a_std`: while |mean| <= 2 std (ReLU, tanh
        outputs), E[a^2] - E[a]^2 loses at most a few ulps of the
        variance; otherwise (e.g. sigmoid outputs bunched near 0.9, or a
        non-finite activation) the corrected two-pass form of `_a_std` on
        `centre()`, the centred activation. The test is read on the host
        (the pass runs eagerly).
        """
        a = self.a
        mean = self.a_mean()
        variance = torch.linalg.vector_norm(a).square() / a.numel() - mean.square()
        if bool(mean.square() <= 4.0 * variance):
            return variance.sqrt()
        return self._a_std(centre())

    def _a_std(self, centred: Any) -> Any:
        # The corrected two-pass algorithm, as `Moments.a_std`.
        size = self.a.numel()
        variance = torch.linalg.vector_norm(centred).square() / size
        variance = variance - (centred.sum() / size).square()
        return variance.clamp(min=0.0).sqrt()

    def _units(self) -> Any:
        a = self.a
        return a.reshape(-1, a.shape[-1] if a.dim() >= 2 else 1)

    def _unit_counts(self) -> Any:
        def compute() -> Any:
            units = self._units()
            if self._finite("a"):
                return units.abs().sign().sum(dim=0)
            return (units != 0).sum(dim=0).float()

        return self._get("_unit_counts", compute)

    def a_nonzero(self) -> Any:
        return self._unit_counts().sum()

    def a_dead(self) -> Any:
        return (self._unit_counts() == 0).sum().float()

    def a_units(self) -> Any:
        a = self.a
        return float(a.shape[-1] if a.dim() >= 2 else 1)

    # The grouped computation of a row.

    def _gradient_group(self, wanted: set[str]) -> None:
        """`g_abs_sum`, `g_abs_max`, `g_nonzero` from one `|g|` in the scratch."""
        g = self.g
        absolute = torch.abs(g, out=self._buffer(g))
        if "g_abs_sum" in wanted:
            self._cache["g_abs_sum"] = absolute.sum()
        if "g_abs_max" in wanted:
            self._cache["g_abs_max"] = absolute.amax()
        if "g_nonzero" in wanted:
            if self._finite("g"):
                self._cache["g_nonzero"] = absolute.sign_().sum()
            else:
                self._cache["g_nonzero"] = (g != 0).sum().float()

    def _activation_group(self, wanted: set[str]) -> None:
        """`a_std`, then the unit counts, in the scratch."""
        a = self.a
        if "a_std" in wanted and "a_std" not in self._cache:
            self._cache["a_std"] = self._std(
                lambda: torch.sub(a, self.a_mean(), out=self._buffer(a))
            )
        if wanted & _UNIT_GROUP and "_unit_counts" not in self._cache:
            units = self._units()
            if self._finite("a"):
                signs = torch.abs(units, out=self._buffer(units)).sign_()
                counts = signs.sum(dim=0)
            else:
                counts = (units != 0).sum(dim=0).float()
            self._cache["_unit_counts"] = counts

    def row(self, moments: Sequence[str]) -> Any:
        wanted = set(moments)
        for first in ("g_sum_sq", "a_mean"):  # the finite tests' sums
            if first in wanted:
                self.moment(first)
        if self.g is not None and wanted & _ABS_GROUP and "_abs_g" not in self._cache:
            self._gradient_group(wanted)
        self._activation_group(wanted)
        self._scratch = None
        values = []
        for moment in moments:
            value = self.moment(moment)
            if isinstance(value, torch.Tensor):
                values.append(value.reshape(()).float())
            else:
                values.append(
                    torch.tensor(value, dtype=torch.float32, device=self.a.device)
                )
        return torch.stack(values)

    # Weight norms.

    @staticmethod
    def weight_squares(
        grads: Sequence[Any], old: list[Any], new: Sequence[Any], scale: Any
    ) -> Any:
        """As `Moments.weight_squares`, with one kernel per norm.

        `old` are copies made for this (`StepHooks.copy`): each becomes
        the variable's update (with the opposite sign) in place.
        """
        values = []
        for g in grads:
            if g is None:
                values.append(torch.tensor(float("nan"), device=old[0].device))
                continue
            g = _float32(g).reshape(-1)
            if scale is not None:
                g = g / scale
            values.append(torch.dot(g, g))
        updates = []
        for o, n in zip(old, new, strict=True):
            o = o.reshape(-1) if o.dtype == torch.float32 else o.reshape(-1).float()
            values.append(torch.dot(o, o))
            update = o.sub_(_float32(n).reshape(-1))  # old - new: -(the update)
            updates.append(torch.dot(update, update))
        # Rows: gradients, updates, weights (see `Moments.weight_squares`).
        count = len(updates)
        return torch.stack(values[:count] + updates + values[count:]).reshape(3, count)
