"""keras-actgrad: see how the gradient of the loss flows through a Keras 3 model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keras_actgrad._registration import register_probes

if TYPE_CHECKING:
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

__version__ = "0.1.0"

__all__ = [
    "ActivationGradientCallback",
    "ActivationGradient",
    "GradientMonitor",
    "GradientProbe",
    "ProbedModel",
    "Report",
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

# Imported on first use (PEP 562), so that reading logs (`load_report`, the
# `keras-actgrad report` command) does not import Keras and its backend.
_LAZY = {
    "ActivationGradientCallback": "keras_actgrad._callback",
    "ActivationGradient": "keras_actgrad._engine",
    "activation_gradients": "keras_actgrad._engine",
    "attention_layers": "keras_actgrad._layers",
    "mlp_layers": "keras_actgrad._layers",
    "transformer_blocks": "keras_actgrad._layers",
    "GradientMonitor": "keras_actgrad._monitor",
    "GradientProbe": "keras_actgrad._probe",
    "ProbedModel": "keras_actgrad._probe",
    "find_probes": "keras_actgrad._probe",
    "insert_probes": "keras_actgrad._probe",
    "strip_probes": "keras_actgrad._probe",
    "Report": "keras_actgrad._report",
    "load_report": "keras_actgrad._report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_actgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# A saved model's probes deserialize by the name the probe module registers:
# registered now if Keras is imported, else as soon as it is.
register_probes()
