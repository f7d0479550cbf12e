"""The passes over a probe batch in chunks (`probe_batch_size`).

One pass per chunk gives its moments; with histograms, a first pass per
chunk gives each tap's range, merged into the whole batch's and passed to
the second as a tensor (so each pass compiles once per chunk shape); with
weight gradients, each chunk's scaled gradient is added, on the device, to
the sum of the previous chunks'. `_statistics.chunks` holds the reducers
and the combination, and says why the result is the whole batch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_actgrad._backends.base import PassConfig
from keras_actgrad._engine.engine import Batch, PassResult, ProbeEngine
from keras_actgrad._statistics import chunks
from keras_actgrad._statistics.statistics import Reduced


def _tensor(value: Any) -> Any:
    return keras.ops.convert_to_tensor(np.asarray(value, np.float32))


def _zero_sums(model: keras.Model) -> dict[str, Any]:
    """A float32 zero per trainable variable path (the gradients' layout)."""
    sums: dict[str, Any] = {}
    for variable in model.trainable_variables:
        if variable.path not in sums:
            sums[variable.path] = keras.ops.zeros(tuple(variable.shape), "float32")
    return sums


def _norm(total: Any) -> float:
    ops = keras.ops
    return float(ops.convert_to_numpy(ops.sqrt(ops.sum(ops.square(total)))))


def reduce_chunks(
    engine: ProbeEngine,
    batches: Sequence[Batch],
    rows: Sequence[int],
    config: PassConfig,
    mean_loss: bool,
) -> tuple[Reduced, PassResult]:
    """The whole batch's `Reduced` from passes over its chunks.

    `config.reducer` is a `chunks.ChunkReducer`; `rows[k]` is the number of
    examples of `batches[k]`; `mean_loss` whether the loss is averaged over
    the batch (else summed). Returns the combined statistics, histograms and
    weight-gradient norms, and the last chunk's `PassResult` (its taps).
    """
    reducer = config.reducer
    if not isinstance(reducer, chunks.ChunkReducer):  # pragma: no cover
        raise TypeError(f"Internal error: expected a ChunkReducer, got {reducer!r}.")
    total = sum(rows)
    shares = [_tensor(n / total if mean_loss else 1.0) for n in rows]
    ranges = None
    if reducer.bins:
        first = dataclasses.replace(
            config,
            weight_gradients=False,
            reducer=chunks.RangeReducer(reducer.scale_gradients),
        )
        found = [
            engine.run(batch, first, {"share": share}).outputs
            for batch, share in zip(batches, shares, strict=True)
        ]
        ranges = _tensor(chunks.merge_ranges(found))
    sums = _zero_sums(engine.model) if config.weight_gradients else None
    outputs = []
    result: PassResult | None = None
    for batch, share in zip(batches, shares, strict=True):
        inputs: dict[str, Any] = {"share": share}
        if ranges is not None:
            inputs["ranges"] = ranges
        if sums is not None:
            inputs["weight_sums"] = sums
        result = engine.run(batch, config, inputs)
        outputs.append(result.outputs)
        if sums is not None:
            sums = result.device
    if result is None:  # pragma: no cover - `split` makes at least one chunk
        raise ValueError("Internal error: a probe batch without chunks.")
    reduced = chunks.combine(reducer, outputs, rows, result.reached, mean_loss)
    if sums:
        reduced.weight_grad_norms = {
            path: _norm(sums[path]) for path in sorted(result.weight_paths)
        }
        missing = np.asarray(result.outputs["missing"]).reshape(-1)
        reduced.without_gradient = [
            path
            for path, flag in zip(sorted(result.weight_paths), missing, strict=True)
            if flag > 0
        ]
    return reduced, result
