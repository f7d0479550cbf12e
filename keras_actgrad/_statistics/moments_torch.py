"""The moments with native torch ops, one kernel each where possible.

The same moments as `moments.Moments`, tested against the same NumPy
definitions; chosen by the backend dispatcher on PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch

from keras_actgrad._statistics.moments import Moments


class TorchMoments(Moments):
    """The statistics' moments with torch ops, one kernel each where possible.

    The pass runs eagerly, so each `keras.ops` call would cost a dispatch
    (argument conversion, dtype checks) on top of its kernel; these are the
    same moments as `Moments`'s, in native torch. Kernels are chosen for CPU
    speed: comparisons against zero (`!=`, `count_nonzero`) are several
    times slower on ReLU outputs than `abs().sign()`, which is used while
    the tensor is finite (`sign(NaN)` is NaN; then `!=` counts exactly).
    """

    g: Any  # only read where the probe has a gradient

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
        if bool(self.grad_finite()):
            return self._abs_g().sign().sum()
        return (self.g != 0).sum().float()

    def g_sample_norm_mean(self) -> Any:
        return self._sample_norms().mean()

    def g_sample_norm_max(self) -> Any:
        return self._sample_norms().amax()

    def g_nonfinite(self) -> Any:
        if bool(self.grad_finite()):
            return 0.0
        return (~torch.isfinite(self.g)).sum().float()

    def a_mean(self) -> Any:
        return self._get("a_mean", lambda: self.a.mean())

    def a_size(self) -> Any:
        return float(self.a.numel())

    def a_std(self) -> Any:
        # The corrected two-pass algorithm, as `Moments.a_std`.
        centred = self.a - self.a_mean()
        size = self.a.numel()
        variance = torch.linalg.vector_norm(centred).square() / size
        variance = variance - (centred.sum() / size).square()
        return variance.clamp(min=0.0).sqrt()

    def _unit_counts(self) -> Any:
        def compute() -> Any:
            a = self.a
            units = a.reshape(-1, a.shape[-1] if a.dim() >= 2 else 1)
            if bool(self.act_finite()):
                return units.abs().sign().sum(dim=0)
            return (units != 0).sum(dim=0).float()

        return self._get("_unit_counts", compute)

    def a_nonzero(self) -> Any:
        return self._unit_counts().sum()

    def a_dead(self) -> Any:
        return (self._unit_counts() == 0).sum().float()

    def a_units(self) -> Any:
        return float(self._unit_counts().numel())

    def row(self, moments: Any) -> Any:
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
