"""The loss of a pass: the model's compiled loss, `"sum"`, or any callable."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import keras

from keras_actgrad._backends.base import LossFn, LossSpec, Tensor
from keras_actgrad._training_loss import TrainingLoss

_NAMED_LOSSES = ("model", "sum")


def _accepts_training(fn: Callable[..., Any]) -> bool:
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def loss_name(function: Callable[..., Any]) -> str:
    """A name for a loss callable that TensorFlow accepts as a scope name.

    A `Loss` opens a name scope named after itself, and TensorFlow rejects
    `<lambda>` (`'<lambda>' is not a valid root scope name`): characters
    other than letters, digits, `_`, `.` and `-` become `_`, and leading
    `_`, `.`, `-` are dropped. A `functools.partial` or a callable object
    is named after its type.
    """
    name = getattr(function, "__name__", None) or type(function).__name__
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).lstrip("_.-")
    return name or "loss"


class _FunctionLoss(keras.losses.Loss):
    """A loss function as a `keras.losses.Loss`: sample weights, reduction.

    (`keras.losses.LossFunctionWrapper` is not part of the public API.)
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        super().__init__(name=loss_name(function))
        self.function = function

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.function(y_true, y_pred)


def _loss_error(loss: Any) -> ValueError:
    return ValueError(
        "`loss` must be 'model', 'sum', a Keras loss name, a callable "
        "`loss(y_true, y_pred) -> scalar`, or "
        "`keras_actgrad.TrainingLoss(function)` with `function(model, data) "
        f"-> scalar`. Received: loss={loss!r}."
    )


def check_loss(loss: Any) -> None:
    """Checks that `loss` is a string or a callable (names resolve later)."""
    if isinstance(loss, TrainingLoss):
        return
    if not (isinstance(loss, str) or callable(loss)):
        raise _loss_error(loss)


def resolve_loss(model: keras.Model, loss: LossSpec, training: bool) -> LossFn:
    """Returns `fn(x, y, y_pred, sample_weight) -> scalar` for `loss`."""
    if isinstance(loss, TrainingLoss):
        # The pass's forward (`base.forward`) returned the loss itself.
        return lambda x, y, y_pred, sample_weight: y_pred
    if isinstance(loss, str) and loss == "model":
        with_training = _accepts_training(model.compute_loss)

        def model_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
            if with_training:
                return model.compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=training,
                )
            return model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight
            )

        return model_loss
    if isinstance(loss, str) and loss == "sum":

        def sum_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
            total = 0.0
            for output in keras.tree.flatten(y_pred):
                total = total + keras.ops.sum(keras.ops.cast(output, "float32"))
            return total

        return sum_loss
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            resolved = None
        if resolved is None:
            raise ValueError(
                f"Unknown `loss`: '{loss}'. Expected 'model' (the compiled "
                "training loss), 'sum' (the sum of all model outputs), a Keras "
                "loss name such as 'mse' or 'categorical_crossentropy', or a "
                "callable `loss(y_true, y_pred) -> scalar`. "
                f"Accepted strings: {list(_NAMED_LOSSES)} and Keras loss names. "
                f"Received: loss='{loss}'."
            )
        loss = resolved
    if not callable(loss):
        raise _loss_error(loss)
    loss_object = loss if isinstance(loss, keras.losses.Loss) else _FunctionLoss(loss)

    function = loss

    def callable_loss(x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
        if y is not None or isinstance(function, keras.losses.Loss):
            return loss_object(y, y_pred, sample_weight=sample_weight)
        # A label-free objective such as a class score: `fn(None, y_pred)`,
        # averaged over the batch (weighted by `sample_weight` if given).
        values = keras.ops.convert_to_tensor(function(None, y_pred))
        if sample_weight is not None and len(values.shape) > 0:
            weights = keras.ops.cast(sample_weight, values.dtype)
            weights = keras.ops.reshape(weights, (-1,) + (1,) * (len(values.shape) - 1))
            values = values * weights
        return keras.ops.mean(values)

    return callable_loss


def needs_labels(loss: LossSpec) -> bool:
    """Whether `loss` needs `y` (plain callables may ignore `y_true`)."""
    if isinstance(loss, TrainingLoss):
        return False
    if isinstance(loss, str):
        return loss != "sum"
    return isinstance(loss, keras.losses.Loss)
