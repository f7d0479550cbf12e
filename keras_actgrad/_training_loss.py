"""`TrainingLoss`: the loss of a training step, written by the user.

At the bottom of the package (it imports only `keras`): the pass's forward
(`_backends.base.forward`) and the loss resolution (`_engine.losses`) both
read it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras

Tensor = Any


def _name(function: Callable[..., Any]) -> str:
    return str(getattr(function, "__name__", None) or type(function).__name__)


class TrainingLoss:
    """The training loss as a function of the model and a batch.

    For models whose `compute_loss` does not describe their training: a
    GAN, a VAE, a distillation model, any model that overrides
    `train_step` (often without a `call`). `function(model, data)` runs the
    forward pass as the training step does (calling the sub-models it
    needs) and returns the scalar loss; the gradient at every tap it
    crosses is d loss / d (tap output). `data` is the batch as
    `train_step` receives it: `x`, or `(x, y)`, or `(x, y, sample_weight)`.

    Pass it as `loss=` to `activation_gradients` or
    `ActivationGradientCallback`. The pass changes nothing in the model:
    variable updates made by the function (BatchNormalization statistics,
    seed generators, metrics) are dropped.

    Args:
        function: callable, `function(model, data) -> scalar loss`.

    Example:

    ```python
    def generator_loss(gan, latent):
        scores = gan.discriminator(gan.generator(latent))
        return keras.ops.mean(keras.ops.softplus(-scores))

    results = keras_actgrad.activation_gradients(
        gan, latent, loss=keras_actgrad.TrainingLoss(generator_loss)
    )
    ```
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        if not callable(function):
            raise ValueError(
                "`TrainingLoss` takes a callable `function(model, data) -> "
                f"scalar loss`. Received: function={function!r}."
            )
        try:
            inspect.signature(function).bind(None, None)
        except TypeError as error:
            raise ValueError(
                "`TrainingLoss` calls `function(model, data)` with two "
                f"positional arguments (the model and the batch), but "
                f"{_name(function)} cannot take them: {error}. Define it "
                "as `def loss(model, data): ...`. Received: function with "
                f"signature {inspect.signature(function)}."
            ) from None
        except ValueError:  # no signature (a builtin): it is called as is
            pass
        self.function = function

    def __call__(self, model: keras.Model, data: Any) -> Tensor:
        loss = self.function(model, data)
        shape = tuple(getattr(loss, "shape", ()) or ())
        if any(size != 1 for size in shape):
            raise ValueError(
                f"`TrainingLoss` expects {_name(self.function)}(model, data) "
                "to return a scalar loss (average or sum it over the batch). "
                f"Received: a tensor of shape {shape}."
            )
        return keras.ops.reshape(loss, ())

    def __repr__(self) -> str:
        return f"TrainingLoss({_name(self.function)})"


def pack(x: Any, y: Any, sample_weight: Any) -> Any:
    """The batch as `train_step` receives it (`TrainingLoss`'s `data`)."""
    if y is None and sample_weight is None:
        return x
    if sample_weight is None:
        return (x, y)
    return (x, y, sample_weight)
