"""keras-actgrad: see how the gradient of the loss flows through a Keras 3 model."""

from keras_actgrad._callback import ActivationGradientCallback
from keras_actgrad._engine import ActivationGradient, activation_gradients
from keras_actgrad._layers import attention_layers, mlp_layers, transformer_blocks
from keras_actgrad._monitor import GradientMonitor
from keras_actgrad._probe import (
    GradientProbe,
    ProbedModel,
    find_probes,
    insert_probes,
    strip_probes,
)
from keras_actgrad._report import Report, load_report
from keras_actgrad._training_loss import TrainingLoss

__version__ = "0.1.0"

__all__ = [
    "ActivationGradientCallback",
    "ActivationGradient",
    "GradientMonitor",
    "GradientProbe",
    "ProbedModel",
    "Report",
    "TrainingLoss",
    "activation_gradients",
    "attention_layers",
    "find_probes",
    "insert_probes",
    "load_report",
    "mlp_layers",
    "strip_probes",
    "transformer_blocks",
    "__version__",
]
