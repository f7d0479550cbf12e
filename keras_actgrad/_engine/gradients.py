"""`activation_gradients`: every tap's activation and gradient, whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import keras
import numpy as np

from keras_actgrad._backends import processes
from keras_actgrad._backends.base import LossSpec, PassConfig, Tensor
from keras_actgrad._engine.engine import get_engine
from keras_actgrad._engine.inputs import batch_size, standardize
from keras_actgrad._layers import Layers, select_layers


@dataclasses.dataclass(frozen=True)
class ActivationGradient:
    """A probe's activation and the gradient of the loss with respect to it.

    Attributes:
        activation: NumPy array, the probe's output on the batch, or `None`
            if the forward pass never reached the probe.
        gradient: NumPy array of the same shape, d loss / d activation as it
            flows back through the probe, or `None` where the probe is not
            connected to the loss (or its tensor is not floating point).
    """

    activation: np.ndarray | None
    gradient: np.ndarray | None


class Unreduced:
    """The reducer that keeps the pass's tensors whole (nothing is reduced)."""

    key: Hashable = "unreduced"

    def __call__(
        self,
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor | None],
        weight_gradients: dict[str, Tensor | None],
        loss: Tensor,
    ) -> Any:
        return {
            "activations": activations,
            "gradients": gradients,
            "weight_gradients": weight_gradients,
            "loss": loss,
        }


def _half_to_float32(array: np.ndarray) -> np.ndarray:
    """Gradients of float16 / bfloat16 probes are returned as float32."""
    if array.dtype.itemsize == 2 and array.dtype.kind in "fV":
        return array.astype(np.float32)
    return array


def activation_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    loss: LossSpec = "model",
    sample_weight: Any = None,
    training: bool = False,
    probe_batch_size: int | None = None,
    layers: Layers | None = None,
) -> dict[str, ActivationGradient]:
    """Every probe's activation and the gradient of the loss with respect to it.

    One forward and one backward pass over the batch, compiled once per input
    signature and reused. The gradient at a probe is d loss / d (probe
    output): what flows back through the probe, as a backward hook on it
    would see. Nothing about the model changes: no weight, BatchNormalization
    statistic, optimizer slot or random-generator state moves.

    Args:
        model: A built Keras model: with `GradientProbe` layers, or any
            model with `layers=`.
        x: Inputs, as `fit` takes them: an array, a list or a dict of arrays.
        y: Labels, as `fit` takes them. Needed unless `loss="sum"` or `loss`
            is a plain function that ignores `y_true` (it then gets `None`).
        loss: `"model"` (the compiled training loss, regularization
            included), `"sum"` (the sum of all model outputs, no labels), a
            Keras loss name, a callable `loss(y_true, y_pred) -> scalar`
            (any Keras loss object or function), or
            `keras_actgrad.TrainingLoss(function)`, the loss of a model that
            overrides `train_step` (a GAN, a VAE): `function(model, data)`
            runs the forward pass and returns the loss, `data` being `x`,
            `(x, y)` or `(x, y, sample_weight)` as given. Defaults to
            `"model"`.
        sample_weight: Optional per-example weights for the loss.
        training: Whether layers run in training mode (Dropout on,
            BatchNormalization on batch statistics). State updates are
            discarded either way. Defaults to `False`.
        probe_batch_size: Run the batch in consecutive chunks of at most
            this many examples, one pass each, and assemble the arrays: the
            device holds one chunk's pass at a time. Each chunk's gradient
            is scaled by its share of a loss averaged over the batch, so the
            result equals the whole batch's up to float32 rounding (needs a
            loss averaged or summed over the batch, without activity
            regularizers under a summed `loss="model"`, and `training=False`
            for layers whose output depends on the batch, such as
            BatchNormalization). `None` runs the batch whole. Defaults to
            `None`.
        layers: Measure at the outputs of these layers, in place, instead
            of at the model's probes: a layer name or path (`layer.path`,
            e.g. `"transformer_layer_0/self_attention/query"`), a glob on
            paths (`"transformer_layer_*"`, `"*/self_attention/query"`;
            `*` stays within a path segment, `**` crosses segments), a
            layer class, a layer object, a predicate `layer -> bool`, or a
            list of these. Sublayers at any depth count (inside custom
            layers, KerasHub blocks, subclassed models). Results are keyed
            by path (`path@1` for a second call of the same layer,
            `path:<i>` for each output of a layer with several). The model
            is left exactly as it was. `None` (the default) measures at the
            model's `GradientProbe`s.

    Returns:
        A dict from probe name to `ActivationGradient`, in the order the
        forward pass reaches the probes (probes it never reaches last, with
        `None` fields).

    Raises:
        ValueError: for a model without probes, an unbuilt or uncompiled
            model (with `loss="model"`), missing labels, inputs of the wrong
            shape, an empty batch, an unknown loss, a `layers` item that
            selects no layer (the message lists close matches), or a
            `probe_batch_size` that is not a positive int or comes with a
            loss neither averaged nor summed over the batch.

    Example:

    ```python
    results = keras_actgrad.activation_gradients(model, x, y)
    for name, result in results.items():
        print(name, np.linalg.norm(result.gradient))
    ```
    """
    engine = get_engine(model)
    config = PassConfig(
        loss=loss,
        training=bool(training),
        weight_gradients=False,
        reducer=Unreduced(),
        sites=() if layers is None else select_layers(model, layers),
    )
    if probe_batch_size is not None:
        return _in_chunks(engine, x, y, sample_weight, config, probe_batch_size)
    result = engine.run(engine.prepare(x, y, sample_weight, loss), config)
    return _results(result, result.outputs)


def _results(result: Any, outputs: Any) -> dict[str, ActivationGradient]:
    activations = outputs["activations"]
    gradients = outputs["gradients"]
    results: dict[str, ActivationGradient] = {}
    for name in result.reached:
        gradient = gradients.get(name)
        results[name] = ActivationGradient(
            activation=activations[name],
            gradient=None if gradient is None else _half_to_float32(gradient),
        )
    for name in result.unreached:
        results[name] = ActivationGradient(activation=None, gradient=None)
    return results


def _in_chunks(
    engine: Any, x: Any, y: Any, sample_weight: Any, config: PassConfig, size: Any
) -> dict[str, ActivationGradient]:
    """`activation_gradients` over consecutive chunks of `size` examples.

    The arrays are written into preallocated whole-batch arrays as each
    chunk arrives (no list of chunks to concatenate: that would hold the
    result twice).
    """
    from keras_actgrad._statistics import chunks

    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ValueError(
            "`probe_batch_size` must be a positive int (the largest chunk of "
            "the batch run at once) or None (the whole batch). "
            f"Received: probe_batch_size={size!r}."
        )
    x, y, sample_weight = standardize(x), standardize(y), standardize(sample_weight)
    if processes().spanning():
        # Several JAX processes: the chunks are those of the global batch.
        x, y, sample_weight = processes().global_batch(x, y, sample_weight)
    total = batch_size(x)
    if total is None or total <= size:
        alone = engine.run(engine.prepare(x, y, sample_weight, config.loss), config)
        return _results(alone, alone.outputs)
    mean_loss = chunks.averaged(engine.model, config.loss)
    parts = [chunks.split(data, size, total) for data in (x, y, sample_weight)]
    whole: dict[str, dict[str, Any]] = {"activations": {}, "gradients": {}}
    start = 0
    result: Any = None
    for cx, cy, cw in zip(*parts, strict=True):
        result = engine.run(engine.prepare(cx, cy, cw, config.loss), config)
        rows = batch_size(cx) or 0
        share = rows / total if mean_loss else 1.0
        for kind in ("activations", "gradients"):
            for name, array in result.outputs[kind].items():
                if array is None:
                    whole[kind][name] = None
                    continue
                if kind == "gradients" and share != 1.0:
                    array = (array * np.asarray(share, array.dtype)).astype(array.dtype)
                if name not in whole[kind]:
                    whole[kind][name] = np.empty(
                        (total, *array.shape[1:]), dtype=array.dtype
                    )
                whole[kind][name][start : start + rows] = array
        start += rows
    return _results(result, whole)
