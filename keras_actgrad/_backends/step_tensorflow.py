"""The monitored step's TensorFlow parts: a `tf.custom_gradient` identity.

The identity's gradient function is traced by `tape.gradient` inside the
train step's `tf.function`, so the reductions it builds are ops of the same
graph, returned with the step's logs. It returns the incoming gradient
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_actgrad._backends.base import keras_train_function
from keras_actgrad._backends.tensorflow import SharedReductions
from keras_actgrad._statistics.moments import xla_compatible


class TensorFlowStepHooks:
    end_of_data: tuple[type[BaseException], ...] = (
        StopIteration,
        tf.errors.OutOfRangeError,
    )
    stateless = False

    @staticmethod
    def identity(
        tensor: Any,
        on_gradient: Callable[[Any, Any], None],
        on_forward: Callable[[Any], None],
    ) -> Any:
        # The tensor itself: a symbolic tensor of the step's graph, which
        # gains a consumer only if the step reads it (`_Trace` does so only
        # for a tap no gradient reaches).
        on_forward(tensor)

        @tf.custom_gradient  # type: ignore[untyped-decorator]
        def identity(x: Any) -> Any:
            def gradient(dy: Any) -> Any:
                on_gradient(x, dy)
                return dy

            return tf.identity(x), gradient

        return identity(tensor)

    @staticmethod
    def backward_functions() -> list[tuple[Any, str, str]]:
        # A custom `train_step` takes each backward pass with `tape.gradient`.
        return [(tf.GradientTape, "gradient", "call")]

    @staticmethod
    def readable(activation: Any) -> bool:
        if not tf.is_symbolic_tensor(activation):
            return True  # eager
        return bool(activation.graph is tf.compat.v1.get_default_graph())

    @staticmethod
    def copy(value: Any) -> Any:
        # Ordered before the optimizer's assignment by the automatic control
        # dependencies of `tf.function`; the assignment then copies on write.
        return tf.identity(value)

    @staticmethod
    def make_train_function(
        model: keras.Model, train_step: Callable[..., Any]
    ) -> Callable[..., Any]:
        # Keras compiles the step with XLA when `model.jit_compile` (its
        # "auto" resolves to True on a machine with a GPU): the statistics
        # then use only ops XLA compiles.
        jit = bool(model.jit_compile) and not model.run_eagerly

        def step(*args: Any) -> Any:
            with xla_compatible(jit):
                return train_step(*args)

        function = keras_train_function(model, step)

        def monitored(*args: Any) -> Any:
            # Keras's own compilation: its `tf.function` shares TensorFlow's
            # retracing count with every Keras train function in the process
            # (one code object), so the monitored step's own first trace
            # would bring Keras's "retracing" warning nearer. Not shown
            # while the monitored step runs; Keras's steps still count.
            logger = logging.getLogger("tensorflow")
            logger.addFilter(_not_retracing)
            try:
                return function(*args)
            finally:
                logger.removeFilter(_not_retracing)

        return monitored

    @staticmethod
    def reductions(jit: bool) -> Callable[..., Any]:
        # Each probe's row reduced by one function per shape, out of line
        # (see `SharedReductions`): the step's graph grows by a call a
        # probe, not by its reductions.
        return SharedReductions(jit)


def _not_retracing(record: logging.LogRecord) -> bool:
    """A `logging` filter: drops TensorFlow's frequent-retracing warning."""
    return "triggered tf.function retracing" not in record.getMessage()
