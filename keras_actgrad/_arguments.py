"""The callbacks' arguments: schedules, the probe batch, the global step.

Shared by the callbacks (`_callback.py`, `_monitor.py`): checks with clear
errors at construction, and the few model facts they read (the global step,
whether this worker writes summaries).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._engine.inputs import describe

FreqSpec = int | Sequence[int] | Callable[[int], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and int(value) > 0


def check_freq(freq: Any) -> FreqSpec:
    if is_int(freq):
        if int(freq) > 0:
            return int(freq)
    elif callable(freq):
        return freq  # type: ignore[no-any-return]
    elif isinstance(freq, Iterable) and not isinstance(freq, (str, bytes, dict)):
        epochs = list(freq)
        if all(is_int(e) and int(e) >= 0 for e in epochs):
            return frozenset(int(e) for e in epochs)  # type: ignore[return-value]
    raise ValueError(
        "`freq` must be a positive int N (probe at epochs with epoch % N == 0), "
        "a list of 0-based epoch indices (ints >= 0), or a callable "
        f"`epoch -> bool`. Received: freq={freq!r}."
    )


def writes_summaries(model: keras.Model) -> bool:
    """False on the non-chief workers of a multi-worker `tf.distribute` run.

    Keras's TensorFlow trainer exposes the model's strategy; its
    `extended.should_save_summary` is False on every worker but the chief
    (`MultiWorkerMirroredStrategy`) and True otherwise. Under several JAX
    processes, process 0 alone writes.
    """
    from keras_actgrad._backends import processes

    if processes().index() != 0:
        return False
    strategy = getattr(model, "distribute_strategy", None)
    extended = getattr(strategy, "extended", None)
    try:
        return bool(getattr(extended, "should_save_summary", True))
    except NotImplementedError:
        return True


def global_step(model: keras.Model) -> int:
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return 0
    try:
        return int(keras.ops.convert_to_numpy(iterations))
    except Exception:  # noqa: BLE001 - an optimizer not built yet
        return 0


def _is_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("tensorflow") and hasattr(
        data, "element_spec"
    )


def first_batch(probe_data: Any) -> tuple[Any, Any, Any]:
    """Returns `(x, y, sample_weight)` of the probe batch, as NumPy."""
    source = "probe_data"
    batch = probe_data
    if isinstance(probe_data, keras.utils.PyDataset):
        if len(probe_data) == 0:
            raise ValueError(
                "`probe_data` is an empty `PyDataset`: it has no batch to take. "
                f"Received: probe_data={probe_data!r}."
            )
        batch = probe_data[0]
        source = "the first batch of `probe_data`"
    elif _is_dataset(probe_data) or (
        not isinstance(probe_data, (tuple, list, dict, str, bytes))
        and getattr(probe_data, "shape", None) is None
        and isinstance(probe_data, Iterable)
    ):
        try:
            batch = next(iter(probe_data))
        except StopIteration:
            raise ValueError(
                "`probe_data` is an empty dataset or generator: it has no batch "
                f"to take. Received: probe_data={probe_data!r}."
            ) from None
        source = "the first batch of `probe_data`"
    if batch is None or isinstance(batch, (str, bytes, numbers.Number)):
        raise ValueError(
            "`probe_data` must be `(x, y)`, `(x, y, sample_weight)`, `x` alone "
            "(an array, a list or a dict of arrays), or a `tf.data.Dataset`, "
            "`keras.utils.PyDataset` or generator yielding such batches. "
            f"Received: probe_data={probe_data!r}."
        )
    if isinstance(batch, tuple):
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                f"{source} is a tuple of {len(batch)} elements; expected `(x,)`, "
                "`(x, y)` or `(x, y, sample_weight)`. Pass multiple inputs as a "
                f"list or dict inside `x`. Received: {describe(batch)}."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    else:
        x, y, sample_weight = batch, None, None
    to_numpy = _numpy_leaves
    return to_numpy(x), to_numpy(y), to_numpy(sample_weight)


def _numpy_leaves(data: Any) -> Any:
    if data is None:
        return None

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) or leaf is None:
            return leaf
        if hasattr(leaf, "numpy") or hasattr(leaf, "__array__"):
            return keras.ops.convert_to_numpy(leaf)
        return leaf

    return keras.tree.map_structure(convert, data)


ON_NONFINITE = ("warn", "raise", "stop")


def check_alert_arguments(
    on_nonfinite: Any,
    histogram_bins: Any,
    vanishing_threshold: Any,
    exploding_threshold: Any,
) -> None:
    """Checks the alert and histogram arguments both callbacks take."""
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(
            f"Unknown `on_nonfinite`: {on_nonfinite!r}. Accepted values: "
            f"{list(ON_NONFINITE)}. Received: on_nonfinite={on_nonfinite!r}."
        )
    if not is_positive_int(histogram_bins):
        raise ValueError(
            "`histogram_bins` must be a positive int. "
            f"Received: histogram_bins={histogram_bins!r}."
        )
    for name, value in (
        ("vanishing_threshold", vanishing_threshold),
        ("exploding_threshold", exploding_threshold),
    ):
        if (
            not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(
                f"`{name}` must be a positive finite number. "
                f"Received: {name}={value!r}."
            )
    if vanishing_threshold >= exploding_threshold:
        raise ValueError(
            "`vanishing_threshold` must be smaller than `exploding_threshold`. "
            f"Received: vanishing_threshold={vanishing_threshold!r}, "
            f"exploding_threshold={exploding_threshold!r}."
        )


def check_log_dir(log_dir: Any) -> str | None:
    """`log_dir` as a string path, or None."""
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError(
            "`log_dir` must be a path (a string) or None. "
            f"Received: log_dir={log_dir!r}."
        )
    return None if log_dir is None else os.fspath(log_dir)
