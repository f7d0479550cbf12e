"""Which weight gradients and weights of a training step are not finite.

One `[2, n]` float32 tensor a step, on the device: per trainable variable,
1.0 where its gradient has a NaN or Inf entry (0.0 for a variable without a
gradient) and 1.0 where the variable holds a NaN or Inf after the update.

The exact per-variable test is a pass over every gradient and weight, so it
runs under a condition that is almost always false: one scalar that is
finite whenever every entry is. With the weight norms the monitor already
computes (`Moments.weight_squares`), that scalar is their sum (a weight
that is not finite after the update makes its update `new - old` not
finite); without them, it is the sum of the gradients' and the new
weights' sums, one reduction over each tensor. A sum that overflows with
finite entries only takes the exact branch, which then reports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

Tensor = Any


def _not_finite(tensor: Tensor) -> Tensor:
    ops = keras.ops
    return ops.cast(ops.logical_not(ops.all(ops.isfinite(tensor))), "float32")


def _not_finite_each(tensors: Sequence[Tensor]) -> Tensor:
    """`_not_finite` of each tensor, as one float32 vector.

    The tensors of one shape and dtype are stacked and tested together: a
    model's weights come in few shapes (ResNet50's 214 in 28), and each
    test is a reduction to trace (and compile), so one a group instead of
    one a tensor makes the monitored step's first trace shorter
    (TensorFlow ResNet50: about 1 s of the first `fit`). The stacks are
    copies, made only in the branch taken when a step is not finite.
    """
    ops = keras.ops
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        key = (tuple(tensor.shape), str(tensor.dtype))
        groups.setdefault(key, []).append(index)
    parts, order = [], []
    for (shape, _), indices in groups.items():
        size = int(np.prod(shape, dtype=np.int64))
        stacked = ops.stack([tensors[i] for i in indices])
        # Rows of the flattened tensors (an empty row is finite).
        rows = ops.reshape(stacked, (len(indices), size))
        finite = ops.all(ops.isfinite(rows), axis=1)
        parts.append(ops.cast(ops.logical_not(finite), "float32"))
        order += indices
    flags = parts[0] if len(parts) == 1 else ops.concatenate(parts)
    if order == sorted(order):
        return flags
    return ops.take(flags, np.argsort(order))


def step_checks(
    grads: Sequence[Tensor | None],
    new: Sequence[Tensor],
    squares: Tensor | None = None,
) -> Tensor:
    """The `[2, n]` flags of a step's gradients and updated weights.

    Args:
        grads: the gradients the optimizer received (None: no gradient).
        new: the variables' values after the update.
        squares: `Moments.weight_squares`'s `[3, n]` tensor of the same
            step, or None.
    """
    ops = keras.ops
    count = len(new)
    if not count:
        return ops.zeros((2, 0), "float32")
    present = [g is not None for g in grads]
    if squares is not None:
        # The gradients' and updates' squared norms (a missing gradient's
        # NaN left out).
        mask = ops.convert_to_tensor(present, "bool")
        grad_sq = ops.where(mask, squares[0], ops.zeros_like(squares[0]))
        total = ops.sum(grad_sq) + ops.sum(squares[1])
    else:
        sums = [ops.cast(ops.sum(g), "float32") for g in grads if g is not None]
        sums += [ops.cast(ops.sum(v), "float32") for v in new]
        total = ops.sum(ops.stack(sums))

    def exact() -> Tensor:
        # The gradients one by one: stacked, on JAX, they made XLA round
        # the step's update differently (training was no longer bit for
        # bit); the updated weights by shape (see `_not_finite_each`).
        zero = ops.zeros((), "float32")
        gradients = ops.stack([zero if g is None else _not_finite(g) for g in grads])
        return ops.stack([gradients, _not_finite_each(new)])

    def nothing() -> Tensor:
        return ops.zeros((2, count), "float32")

    return ops.cond(ops.logical_not(ops.isfinite(total)), exact, nothing)


def nonfinite_variables(variables: Sequence[Any]) -> list[str]:
    """Paths of the variables holding a NaN or Inf (one transfer to the host)."""
    if not variables:
        return []
    ops = keras.ops
    flags = ops.convert_to_numpy(
        ops.stack([_not_finite(v.value) for v in variables])
    ).reshape(-1)
    return [v.path for v, flag in zip(variables, flags, strict=True) if flag > 0]
