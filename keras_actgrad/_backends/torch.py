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

When the reducer reduces probe by probe (`base.ProbeReducer`, the
callback's statistics), each tap is an `autograd.Function` (`_Tap`) whose
backward reduces the probe's gradient as it arrives (its activation's
share was reduced at the tap, in the forward pass, so the tap saves no
activation for the backward pass); the taps share one
scalar `anchor`, and only the anchor is differentiated, so no probe's
gradient is kept (`autograd.grad` on the taps would hold all of them until
the backward pass ends: an 8-probe event took 1.5x a training step's peak
memory, now 1.0x; benchmarks/bench_memory.py).

There is no trace in eager mode; to keep `trace_count` meaning the same on
every backend, `on_trace` fires once per new input signature (shapes and
dtypes of the batch) or when the probes reached change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch

from keras_actgrad._backends.base import (
    LossFn,
    PassConfig,
    ProbeReducer,
    Tapped,
    TapRecorder,
    forward,
    loss_scale,
    loss_scaled,
    probe_scope,
    reduce,
    to_float32,
)
from keras_actgrad._statistics.moments import Moments
from keras_actgrad._statistics.moments_torch import TorchMoments


def _is_float(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


def _signature(data: Any) -> Any:
    return tuple(
        (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf))))
        for leaf in keras.tree.flatten(data)
    )


def _gradients(loss: Any, inputs: list[Any], scale: float | None) -> list[Any]:
    """d loss / d inputs in float32 (`None` where unused).

    With `scale`, the backward pass is loss-scaled (see `base.loss_scaled`).
    """
    if scale is None:
        found = torch.autograd.grad(loss, inputs, allow_unused=True)
        return [to_float32(g) for g in found]
    seed = torch.full_like(loss, scale)
    found = torch.autograd.grad(
        loss, inputs, grad_outputs=seed, allow_unused=True, retain_graph=True
    )
    present = [i for i, g in enumerate(found) if g is not None]
    kept = [inputs[i] for i in present]

    def compute(current: Any) -> list[Any]:
        grads = torch.autograd.grad(
            loss,
            kept,
            grad_outputs=current * torch.ones_like(loss),
            retain_graph=True,
        )
        return [to_float32(g) for g in grads]

    first = [to_float32(found[i]) for i in present]
    unscaled = loss_scaled(compute, torch.tensor(scale, device=loss.device), first)
    result: list[Any] = list(found)
    for i, g in zip(present, unscaled, strict=True):
        result[i] = g
    return result


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class _Tap(torch.autograd.Function):
    """An identity whose backward pass calls `on_gradient(gradient)`.

    `anchor` is a scalar every tap takes as a second input (its gradient is
    zero): differentiating it runs the backward pass through every tap
    connected to the loss, without keeping any tap's gradient. The tap
    saves nothing for the backward pass: it keeps no activation alive.
    """

    @staticmethod
    def forward(
        ctx: Any, tensor: Any, anchor: Any, on_gradient: Callable[[Any], None]
    ) -> Any:
        ctx.on_gradient = on_gradient
        ctx.anchor_device = anchor.device
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, gradient: Any) -> Any:
        with torch.no_grad():
            ctx.on_gradient(gradient)
        passed = gradient if ctx.needs_input_grad[0] else None
        return passed, torch.zeros((), device=ctx.anchor_device), None


class TorchAdapter:
    """Runs the pass eagerly with `torch.autograd.grad`."""

    moments: type[Moments] = TorchMoments

    def compile(
        self,
        model: keras.Model,
        loss_fn: LossFn,
        config: PassConfig,
        on_trace: Callable[[list[Tapped]], None],
    ) -> Callable[..., Any]:
        seen: set[Any] = set()
        last_probes: list[tuple[str, bool]] = []

        def step(x: Any, y: Any, sample_weight: Any, reducer_inputs: Any = None) -> Any:
            reducer = config.reducer
            # A reducer that takes the pass's inputs (the chunked one) is
            # called on the whole pass.
            per_probe = isinstance(reducer, ProbeReducer) and reducer_inputs is None
            # Per probe: each tap reduces its probe inside the backward pass
            # (`_Tap`), once `inside` is set after the forward pass; all taps
            # share one scalar `anchor`, the only input differentiated, so
            # no probe's gradient outlives its reductions.
            anchor = torch.zeros((), requires_grad=True)
            inside = [False]
            # The activation's share of each probe is reduced at the tap, in
            # the forward pass (so no tap keeps its activation for the
            # backward pass), the gradient's inside the backward pass.
            forward_shares: list[list[Any]] = []
            reduced: dict[str, list[Any]] = {}
            # Names only: a tap's backward node must not reach the taps'
            # tensors (a reference cycle would keep the whole pass alive
            # until Python's garbage collector runs).
            names: list[str] = []

            def reduce_in_backward(index: int, gradient: Any) -> None:
                if inside[0]:
                    name = names[index]
                    reduced[name] = reducer.reduce_gradient(to_float32(gradient))  # type: ignore[attr-defined]

            def node(tensor: Any) -> Any:
                if per_probe:
                    index = sum(t.differentiable for t in tapped)
                    with torch.no_grad():
                        forward_shares.append(
                            reducer.reduce_activation(tensor.detach())  # type: ignore[attr-defined]
                        )
                    on_gradient = functools.partial(reduce_in_backward, index)
                    return _Tap.apply(tensor, anchor, on_gradient)  # type: ignore[no-untyped-call]
                if tensor.requires_grad:
                    return tensor.view_as(tensor)
                return tensor.detach().requires_grad_()

            recorder = TapRecorder(_is_float, node)
            tapped = recorder.tapped
            # An unseeded Dropout draws from torch's global generator: fork it,
            # so the probe pass leaves the training's random stream untouched.
            with torch.random.fork_rng(devices=_cuda_devices()), torch.enable_grad():
                with probe_scope(model):
                    y_pred = forward(
                        model,
                        x,
                        config.training,
                        recorder.tap,
                        config.sites,
                        config.loss,
                    )
                    loss = loss_fn(x, y, y_pred, sample_weight)
                    loss = keras.ops.cast(loss, "float32")
                probes = [(t.name, t.differentiable) for t in tapped]
                key = (_signature((x, y, sample_weight)), tuple(probes))
                if key not in seen or probes != last_probes:
                    seen.add(key)
                    last_probes[:] = probes
                    on_trace(tapped)
                differentiable = [t for t in tapped if t.differentiable]
                handles = [t.handle for t in differentiable]
                variables = (
                    list(model.trainable_variables) if config.weight_gradients else []
                )
                values = [v.value for v in variables]
                float16 = any(h.dtype == torch.float16 for h in handles)
                if per_probe and not float16:
                    names.extend(t.name for t in differentiable)
                    inside[0] = True
                    return self._reduced(
                        tapped,
                        forward_shares,
                        reduced,
                        anchor,
                        loss,
                        variables,
                        values,
                        config,
                    )
                inputs = handles + [v for v in values if v.requires_grad]
                if inputs and loss.requires_grad:
                    found = _gradients(
                        loss, inputs, loss_scale(model) if float16 else None
                    )
                else:
                    found = [None] * len(inputs)
            del y_pred

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
                return reduce(
                    config.reducer,
                    activations,
                    gradients,
                    weight_gradients,
                    loss,
                    reducer_inputs,
                )

        return step

    @staticmethod
    def _reduced(
        tapped: list[Tapped],
        forward_shares: list[list[Any]],
        reduced: dict[str, list[Any]],
        anchor: Any,
        loss: Any,
        variables: list[Any],
        values: list[Any],
        config: PassConfig,
    ) -> Any:
        """The per-probe pass's output: backward through every tap, then combine.

        Runs inside the pass's `enable_grad` and random-generator scope.
        """
        reducer: Any = config.reducer
        weights = [v for v in values if v.requires_grad]
        inputs = [anchor, *weights]
        found: list[Any] = [None] * len(inputs)
        if loss.requires_grad:
            found = list(torch.autograd.grad(loss, inputs, allow_unused=True))
        weight_found = iter(found[1:])
        weight_gradients = {
            v.path: to_float32(next(weight_found)) if value.requires_grad else None
            for v, value in zip(variables, values, strict=True)
        }
        with torch.no_grad():
            shares = iter(forward_shares)
            activation_shares = {
                t.name: next(shares)
                if t.differentiable
                else reducer.reduce_activation(_detach(t.activation))
                for t in tapped
            }
            for t in tapped:
                if t.name not in reduced:  # not reached by the gradient
                    reduced[t.name] = reducer.reduce_gradient(None)
            return reducer.combine(activation_shares, reduced, weight_gradients)

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                # `.numpy()` rejects bfloat16: go through float32 (exact).
                import ml_dtypes  # a Keras dependency

                return tensor.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)
            return np.asarray(tensor.numpy())
        return np.asarray(value)
