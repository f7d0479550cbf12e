"""The pass: the batch and its checks (`inputs`), the loss (`losses`), the
compiled pass and its result (`engine`), and `activation_gradients`
(`gradients`)."""

from keras_actgrad._engine.engine import (
    Batch,
    PassResult,
    ProbeEngine,
    check_model,
    get_engine,
)
from keras_actgrad._engine.gradients import (
    ActivationGradient,
    Unreduced,
    activation_gradients,
)

__all__ = [
    "ActivationGradient",
    "Batch",
    "PassResult",
    "ProbeEngine",
    "Unreduced",
    "activation_gradients",
    "check_model",
    "get_engine",
]
