"""The monitored step's JAX parts: a `jax.custom_vjp` identity.

Keras's JAX train step is pure, `train_step(state, data) -> (logs, state)`,
differentiated with `jax.value_and_grad` inside `jax.jit`. The identity's
backward function is called while that step is traced (at the level of the
jit trace), so the reductions it builds are values of the step and are
returned with its logs. It returns the cotangent unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import keras

from keras_actgrad._backends.base import call_directly, keras_train_function


class JaxStepHooks:
    end_of_data: tuple[type[BaseException], ...] = (StopIteration,)
    stateless = True

    @staticmethod
    def identity(
        tensor: Any,
        on_gradient: Callable[[Any, Any], None],
        on_forward: Callable[[Any], None],
    ) -> Any:
        @jax.custom_vjp
        def identity(x: Any) -> Any:
            return x

        def forward(x: Any) -> Any:
            # Called on the primal value, a value of the step's own trace
            # (not one of the differentiation's), which the step may read
            # after `value_and_grad`: the backward function is not called
            # at all for a tap that no gradient reaches.
            on_forward(x)
            return x, x

        def backward(activation: Any, gradient: Any) -> Any:
            on_gradient(activation, gradient)
            return (gradient,)

        identity.defvjp(forward, backward)
        return identity(tensor)

    @staticmethod
    def backward_functions() -> list[tuple[Any, str, str]]:
        # A custom `train_step` differentiates with these (called as
        # `jax.value_and_grad(...)`: the module's attributes are wrapped).
        return [
            (jax, "grad", "transform"),
            (jax, "value_and_grad", "transform"),
            (jax, "vjp", "vjp"),
        ]

    @staticmethod
    def readable(activation: Any) -> bool:
        trace = getattr(activation, "_trace", None)
        if trace is None:
            return True  # a concrete array
        try:
            from jax._src import core
        except ImportError:  # pragma: no cover - a JAX without it
            return False
        return bool(trace is core.trace_ctx.trace)

    @staticmethod
    def copy(value: Any) -> Any:
        return value  # immutable

    @staticmethod
    def make_train_function(
        model: keras.Model, train_step: Callable[..., Any]
    ) -> Callable[..., Any]:
        return keras_train_function(model, train_step)

    @staticmethod
    def reductions(jit: bool) -> Callable[..., Any]:
        return call_directly
