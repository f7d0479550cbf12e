"""The batch of a pass: conversion as `fit` does it, and checks with clear errors.

Every check runs before anything is traced, so a batch that does not fit
the model fails with a message that names what was expected and what was
received, not with a backend's trace error.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_actgrad._backends.base import LossSpec
from keras_actgrad._engine.losses import needs_labels
from keras_actgrad._probe import _is_graph_model


def _as_arrays(data: Any) -> Any:
    """Nested Python lists of numbers become NumPy arrays, as in `fit`.

    (A `tf.function` would otherwise treat every number as a constant and
    retrace for each new value.)
    """
    if isinstance(data, dict):
        return {key: _as_arrays(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        leaves = keras.tree.flatten(data)
        if leaves and all(isinstance(v, (bool, int, float, np.number)) for v in leaves):
            try:
                return np.asarray(data)
            except ValueError:  # ragged: leave it to the model to complain
                return data
        return type(data)(_as_arrays(value) for value in data)
    return data


def standardize(data: Any) -> Any:
    """Converts NumPy float64 leaves to `floatx()`, as Keras data adapters do.

    Nested Python lists of numbers are converted to arrays first.
    """
    if data is None:
        return None
    data = _as_arrays(data)
    floatx = keras.config.floatx()

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) and leaf.dtype == np.float64:
            return leaf.astype(floatx)
        return leaf

    return keras.tree.map_structure(convert, data)


def _shape(value: Any) -> tuple[Any, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def describe(data: Any) -> str:
    """A short description of a (nested) batch, for error messages."""
    if data is None:
        return "None"
    if isinstance(data, dict):
        return "{" + ", ".join(f"'{k}': {describe(v)}" for k, v in data.items()) + "}"
    if isinstance(data, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in data) + "]"
    shape = _shape(data)
    if shape is not None:
        return f"array of shape {shape} and dtype {getattr(data, 'dtype', '?')}"
    return f"{type(data).__name__}"


def batch_size(x: Any) -> int | None:
    for leaf in keras.tree.flatten(x):
        shape = _shape(leaf)
        if shape:
            return int(shape[0]) if shape[0] is not None else None
    return None


def _declared_inputs(model: keras.Model) -> Any:
    """The model's input structure (`KerasTensor`s), or None if unknown.

    `Sequential.input` fails until the model has been called on data, so a
    Sequential model's single input comes from `inputs`.
    """
    if not _is_graph_model(model):
        return None
    try:
        inputs = model.inputs
    except AttributeError:
        return None
    if not inputs:
        return None
    if isinstance(model, keras.Sequential):
        return inputs[0]
    return model.input


def check_inputs(model: keras.Model | None, x: Any) -> None:
    """Checks `x` against the model's declared inputs, before any tracing."""
    if x is None:
        raise ValueError(
            "The probe batch `x` is None. Pass the inputs of model "
            f"'{getattr(model, 'name', '')}' as `fit` takes them (an array, a "
            "list or a dict of arrays). "
            "Received: x=None."
        )
    for leaf in keras.tree.flatten(x):
        if _shape(leaf) is None and not isinstance(leaf, (bool, int, float)):
            raise ValueError(
                f"The probe batch must be arrays (one batch, as `model(x)` takes "
                f"it), not a {type(leaf).__name__}. A dataset or generator holds "
                "many batches: take one first, e.g. "
                "`x, y = next(iter(dataset))`. "
                f"Received: x={describe(x)}."
            )
    size = batch_size(x)
    if size == 0:
        raise ValueError(
            "The probe batch is empty: it has 0 examples. Pass at least one "
            f"example. Received: x={describe(x)}."
        )
    if model is None:  # a `TrainingLoss`'s batch: read by its function
        return
    declared = _declared_inputs(model)
    if declared is None:
        return
    specs = keras.tree.flatten(declared)
    if isinstance(x, dict) and isinstance(declared, dict):
        missing = sorted(set(declared) - set(x))
        if missing:
            raise ValueError(
                f"The probe batch is missing inputs {missing} of model "
                f"'{model.name}'. Expected a dict with keys "
                f"{sorted(declared)}. Received: x={describe(x)}."
            )
        leaves = [x[name] for name in declared]
        specs = [declared[name] for name in declared]
    elif isinstance(x, dict) and all(
        getattr(spec, "name", None) in x for spec in specs
    ):
        # A dict keyed by input names, for inputs declared as a list.
        leaves = [x[spec.name] for spec in specs]
    else:
        leaves = keras.tree.flatten(x)
    if len(leaves) != len(specs):
        raise ValueError(
            f"Model '{model.name}' takes {len(specs)} input(s) but the probe batch "
            f"holds {len(leaves)} array(s). Expected inputs of shapes "
            f"{[tuple(s.shape) for s in specs]}. Received: x={describe(x)}."
        )
    for spec, leaf in zip(specs, leaves, strict=True):
        shape = _shape(leaf)
        expected = tuple(spec.shape)
        if shape is None:
            continue
        if len(shape) != len(expected) or any(
            e is not None and e != s
            for e, s in zip(expected[1:], shape[1:], strict=True)
        ):
            raise ValueError(
                f"The probe batch does not fit model '{model.name}': input "
                f"'{getattr(spec, 'name', '?')}' expects shape {expected} "
                f"(None is the batch axis), but the array given for it has "
                f"shape {shape}. Pass arrays shaped like the model's inputs, "
                f"as `fit` takes them. Received: x={describe(x)}."
            )
        kind = getattr(getattr(leaf, "dtype", None), "kind", None)
        if _is_numeric_spec(spec) and kind is not None and kind not in "biuf":
            raise ValueError(
                f"The probe batch does not fit model '{model.name}': input "
                f"'{getattr(spec, 'name', '?')}' expects numbers of dtype "
                f"{spec.dtype}, but the array given for it has dtype "
                f"{leaf.dtype}, which cannot be converted to it. Pass numeric "
                f"arrays (e.g. `x.astype('{spec.dtype}')`). "
                f"Received: x={describe(x)}."
            )


def _declared_outputs(model: keras.Model) -> list[tuple[Any, ...]] | None:
    if not _is_graph_model(model):
        return None
    try:
        return [tuple(output.shape) for output in keras.tree.flatten(model.outputs)]
    except (AttributeError, ValueError):
        return None


def _is_numeric_spec(spec: Any) -> bool:
    dtype = str(getattr(spec, "dtype", ""))
    return dtype == "bool" or dtype.startswith(("int", "uint", "float", "bfloat"))


def check_labels(y: Any, sample_weight: Any, loss: LossSpec) -> None:
    """Checks that `y` and `sample_weight` hold numbers."""
    if not needs_labels(loss):
        return
    for argument, value in (("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(value) if value is not None else []:
            kind = getattr(getattr(leaf, "dtype", None), "kind", None)
            if kind is not None and kind not in "biuf":
                raise ValueError(
                    f"`{argument}` must hold numbers, but it has an array of "
                    f"dtype {leaf.dtype}. Encode labels as numbers (e.g. class "
                    f"indices) as `fit` needs them. Received: "
                    f"{argument}={describe(value)}."
                )


def check_batch_sizes(x: Any, y: Any, sample_weight: Any) -> None:
    """Checks that x, y and sample_weight hold the same number of examples."""
    sizes: dict[str, set[int]] = {}
    for label, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(data) if data is not None else []:
            shape = _shape(leaf)
            if shape and shape[0] is not None:
                sizes.setdefault(label, set()).add(int(shape[0]))
    found = set().union(*sizes.values()) if sizes else set()
    if len(found) > 1:
        counts = ", ".join(f"{label}: {sorted(n)}" for label, n in sizes.items())
        raise ValueError(
            "The arrays of the probe batch hold different numbers of examples "
            f"({counts}). Every array in `x`, `y` and `sample_weight` needs the "
            "same first (batch) dimension. "
            f"Received: x={describe(x)}, y={describe(y)}, "
            f"sample_weight={describe(sample_weight)}."
        )
