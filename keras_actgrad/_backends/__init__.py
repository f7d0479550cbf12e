"""The backend dispatcher: the one place that names the adapters.

`base.py` is the contract; `tensorflow.py`, `jax.py` and `torch.py` each
implement it for one Keras backend and are imported only here, on first
use, so a backend's framework is imported only when Keras runs on it.
"""

from __future__ import annotations

import keras

from keras_actgrad._backends.base import (
    Adapter,
    OneProcess,
    Processes,
    Replicas,
    StepHooks,
)
from keras_actgrad._statistics.moments import Moments

BACKENDS = ("tensorflow", "jax", "torch")


def adapter_class() -> type[Adapter]:
    """The adapter class of the Keras backend in use."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_actgrad._backends.tensorflow import TensorFlowAdapter

        return TensorFlowAdapter
    if backend == "jax":
        from keras_actgrad._backends.jax import JaxAdapter

        return JaxAdapter
    if backend == "torch":
        from keras_actgrad._backends.torch import TorchAdapter

        return TorchAdapter
    raise NotImplementedError(
        f"keras-actgrad supports the {', '.join(repr(b) for b in BACKENDS)} Keras "
        f"backends. Set KERAS_BACKEND to one of them. "
        f"Received: KERAS_BACKEND='{backend}'."
    )


def get_adapter() -> Adapter:
    """A new adapter for the Keras backend in use."""
    return adapter_class()()


def moments_class() -> type[Moments]:
    """The moments of the Keras backend in use (native ops where faster)."""
    return adapter_class().moments


def step_moments_class() -> type[Moments]:
    """The moments of the monitored training step for the backend in use."""
    if keras.backend.backend() == "tensorflow":
        from keras_actgrad._statistics.moments_tensorflow import (
            TensorFlowStepMoments,
        )

        return TensorFlowStepMoments
    return moments_class()


def step_hooks() -> type[StepHooks]:
    """The monitored step's hooks for the Keras backend in use."""
    backend = keras.backend.backend()
    adapter_class()  # the same check of the backend
    if backend == "tensorflow":
        from keras_actgrad._backends.step_tensorflow import TensorFlowStepHooks

        return TensorFlowStepHooks
    if backend == "jax":
        from keras_actgrad._backends.step_jax import JaxStepHooks

        return JaxStepHooks
    from keras_actgrad._backends.step_torch import TorchStepHooks

    return TorchStepHooks


def replicas() -> type[Replicas]:
    """How the monitored step combines replicas (TensorFlow's `tf.distribute`)."""
    backend = keras.backend.backend()
    adapter_class()  # the same check of the backend
    if backend == "tensorflow":
        from keras_actgrad._backends.replicas_tensorflow import TensorFlowReplicas

        return TensorFlowReplicas
    if backend == "jax":
        from keras_actgrad._backends.replicas_jax import JaxReplicas

        return JaxReplicas
    from keras_actgrad._backends.replicas_torch import TorchReplicas

    return TorchReplicas


def processes() -> type[Processes]:
    """The processes of a multi-host run (JAX); one process elsewhere."""
    if keras.backend.backend() == "jax":
        from keras_actgrad._backends.processes_jax import JaxProcesses

        return JaxProcesses
    return OneProcess


def build_optimizer_before_tracing(model: keras.Model) -> None:
    """Before `fit`'s first step: the optimizer built where that saves a trace.

    TensorFlow only (see `tensorflow.build_optimizer_before_tracing`):
    Keras's JAX trainer builds the optimizer before tracing, and the torch
    step is not traced.
    """
    if keras.backend.backend() == "tensorflow":
        from keras_actgrad._backends import tensorflow

        tensorflow.build_optimizer_before_tracing(model)
