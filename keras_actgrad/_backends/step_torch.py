"""The monitored step's PyTorch parts: a backward hook on a view.

Keras's torch train step runs eagerly: the probe's output becomes a fresh
autograd node (`view_as`) with a tensor hook, which reduces the gradient
under `torch.no_grad()` as `loss.backward()` reaches it and returns None
(the gradient flows on unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import torch

from keras_actgrad._backends.base import call_directly


class TorchStepHooks:
    end_of_data: tuple[type[BaseException], ...] = (StopIteration,)
    stateless = False

    @staticmethod
    def identity(
        tensor: Any,
        on_gradient: Callable[[Any, Any], None],
        on_forward: Callable[[Any], None],
    ) -> Any:
        if not tensor.requires_grad:
            on_forward(tensor.detach())
            return tensor
        output = tensor.view_as(tensor)
        # Held until the hook has run, and no longer: the graph's nodes (and
        # their hooks) live until the train step drops its loss, after the
        # optimizer's update; an activation held by the hook would stay
        # alive through the update, which then allocates fresh memory for
        # its temporaries (on CPU, page faults: measured on the reference
        # MLP, Adam's update 7 -> 15-22 ms a step).
        held = [output.detach()]
        # (The caller drops its handle when the hook runs, as `held` does.)
        on_forward(held[0])

        def hook(gradient: Any) -> None:
            if not held:  # pragma: no cover - one backward pass a step
                return
            with torch.no_grad():
                on_gradient(held.pop(), gradient.detach())

        output.register_hook(hook)
        return output

    @staticmethod
    def backward_functions() -> list[tuple[Any, str, str]]:
        # `loss.backward()` calls `torch.autograd.backward` (read from the
        # module at each call), as a custom `train_step` may call it or
        # `torch.autograd.grad` itself.
        return [
            (torch.autograd, "backward", "call"),
            (torch.autograd, "grad", "call"),
        ]

    @staticmethod
    def readable(activation: Any) -> bool:
        return True

    @staticmethod
    def copy(value: Any) -> Any:
        return value.detach().clone()

    @staticmethod
    def make_train_function(
        model: keras.Model, train_step: Callable[..., Any]
    ) -> Callable[..., Any]:
        if model.jit_compile:
            raise ValueError(
                "`GradientMonitor` reads gradients with tensor hooks, which "
                "`torch.compile` does not run as written. Compile the model "
                "with `jit_compile=False` (the default on PyTorch). Received: "
                "jit_compile=True."
            )

        # Keras 3.15.1's torch trainer: `one_step_on_data(data)` runs
        # `self.train_step(data[0])`.
        def one_step_on_data(data: Any) -> Any:
            return train_step(data[0])

        return one_step_on_data

    @staticmethod
    def reductions(jit: bool) -> Callable[..., Any]:
        return call_directly
