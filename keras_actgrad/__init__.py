"""keras-actgrad: see how the gradient of the loss flows through a Keras 3 model."""

from keras_actgrad._engine import ActivationGradient, activation_gradients
from keras_actgrad._probe import GradientProbe, find_probes, insert_probes, strip_probes

__version__ = "0.1.0"

__all__ = [
    "ActivationGradient",
    "GradientProbe",
    "activation_gradients",
    "find_probes",
    "insert_probes",
    "strip_probes",
    "__version__",
]
