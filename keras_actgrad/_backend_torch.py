"""The PyTorch adapter: the only module of the engine that imports torch.

Each probe output is made a fresh autograd node (`view_as`), and
`torch.autograd.grad` takes the gradient of the loss with respect to these
nodes: it flows back only through the probe's consumers, so uses of the
probe's input that bypass it are not counted, as on TensorFlow. A probe whose
input does not require grad (nothing upstream has trainable weights) sees a
detached copy that does. `allow_unused=True` reports `None` for a probe not
connected to the loss.

The pass runs eagerly (no `torch.compile`): Keras layers recompile poorly
under TorchDynamo, and a probe pass is one forward and one backward, the
same work as a training step. Nothing outlives the call: the reducer sees
detached tensors and runs under `torch.no_grad()`, so no autograd graph, and
no tensor of it, is kept. Parameters' `.grad` are never touched, and the
global random generator is restored after the pass (an unseeded `Dropout`
draws from it).

There is no trace in eager mode; to keep `trace_count` meaning the same on
every backend, `on_trace` fires once per new input signature (shapes and
dtypes of the batch) or when the probes reached change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch

from keras_actgrad._engine import (
    SCALE_DIVISOR,
    LossFn,
    PassConfig,
    Tapped,
    TapRecorder,
    forward,
    loss_scale,
    probe_scope,
)
from keras_actgrad._statistics import _Probe, register_moments


def _is_float(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


def _signature(data: Any) -> Any:
    return tuple(
        (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf))))
        for leaf in keras.tree.flatten(data)
    )


def _gradients(loss: Any, inputs: list[Any], scale: float) -> tuple[Any, ...]:
    """d loss / d inputs in float32; loss-scaled when `scale` > 1.

    With float16 probes the backward pass runs with the output gradient
    `scale`; while the gradients overflow (and the scale is above 1) the
    scale is divided by `SCALE_DIVISOR`, as TensorFlow's adapter and
    `keras.optimizers.LossScaleOptimizer` do. Unscaled in float32.
    """
    if scale == 1.0:
        found = torch.autograd.grad(loss, inputs, allow_unused=True)
        return tuple(None if g is None else _to_float32(g) for g in found)
    while True:
        seed = torch.full_like(loss, scale)
        found = torch.autograd.grad(
            loss, inputs, grad_outputs=seed, allow_unused=True, retain_graph=scale > 1
        )
        grads = tuple(None if g is None else _to_float32(g) / scale for g in found)
        finite = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
        if finite or scale <= 1.0:
            return grads
        scale = max(scale / SCALE_DIVISOR, 1.0)


def _to_float32(gradient: Any) -> Any:
    if gradient.dtype in (torch.float16, torch.bfloat16):
        return gradient.float()
    return gradient


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class TorchMoments(_Probe):
    """The statistics' moments with torch ops, one kernel each where possible.

    The pass runs eagerly, so each `keras.ops` call would cost a dispatch
    (argument conversion, dtype checks) on top of its kernel; these are the
    same moments as `_Probe`'s, in native torch. Kernels are chosen for CPU
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
        # The corrected two-pass algorithm, as `_Probe.a_std`.
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


register_moments("torch", TorchMoments)


class TorchAdapter:
    """Runs the probe pass eagerly with `torch.autograd.grad`."""

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[[Any, Any, Any], Any]:
        seen: set[Any] = set()
        last_probes: list[tuple[str, bool]] = []

        def step(x: Any, y: Any, sample_weight: Any) -> Any:
            def node(tensor: Any) -> Any:
                if tensor.requires_grad:
                    return tensor.view_as(tensor)
                return tensor.detach().requires_grad_()

            recorder = TapRecorder(_is_float, node)
            tapped = recorder.tapped
            # An unseeded Dropout draws from torch's global generator: fork it,
            # so the probe pass leaves the training's random stream untouched.
            with torch.random.fork_rng(devices=_cuda_devices()), torch.enable_grad():
                with probe_scope(model):
                    y_pred = forward(model, x, config.training, recorder.tap)
                    loss = loss_fn(x, y, y_pred, sample_weight)
                    loss = keras.ops.cast(loss, "float32")
                handles = [t.handle for t in tapped if t.differentiable]
                variables = (
                    list(model.trainable_variables) if config.weight_gradients else []
                )
                values = [v.value for v in variables]
                inputs = handles + [v for v in values if v.requires_grad]
                if inputs and loss.requires_grad:
                    float16 = any(h.dtype == torch.float16 for h in handles)
                    found = _gradients(
                        loss, inputs, loss_scale(model) if float16 else 1.0
                    )
                else:
                    found = (None,) * len(inputs)
            del y_pred

            probes = [(t.name, t.differentiable) for t in tapped]
            key = (_signature((x, y, sample_weight)), tuple(probes))
            if key not in seen or probes != last_probes:
                seen.add(key)
                last_probes[:] = probes
                on_trace(tapped)

            probe_grads = iter(found[: len(handles)])
            gradients = {
                t.name: next(probe_grads) if t.differentiable else None for t in tapped
            }
            weight_found = iter(found[len(handles) :])
            weight_gradients = {
                v.path: next(weight_found) if value.requires_grad else None
                for v, value in zip(variables, values, strict=True)
            }
            activations = {t.name: _detach(t.activation) for t in tapped}
            loss = loss.detach()
            with torch.no_grad():
                return config.reducer(activations, gradients, weight_gradients, loss)

        return step

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                # `.numpy()` rejects bfloat16: go through float32 (exact).
                import ml_dtypes  # a Keras dependency

                return tensor.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)
            return np.asarray(tensor.numpy())
        return np.asarray(value)
