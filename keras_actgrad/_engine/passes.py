"""A custom `train_step`'s backward passes and optimizers (`_engine.step`).

A model that overrides `train_step` (a GAN, a VAE, a distillation model)
takes its own backward passes and applies its own optimizers. While its
monitored step is traced, the functions that take a backward pass are
wrapped (`wrap_backward`) so that the trace tells the passes apart (`Pass`),
and every optimizer the model holds is observed (`observer`): the norms of
the gradients it receives and of the update it makes, and which pass's
gradients they are (which names the pass).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import keras

from keras_actgrad._backends import step_hooks

Tensor = Any

NO_TAP_CROSSED = (
    "`GradientMonitor` found no backward pass of the training step that "
    "reaches a tap: no gradient of any loss the step differentiates flows "
    "through a `GradientProbe` (or a layer selected with `layers=`). Place "
    "the probes in the sub-models the step differentiates (e.g. "
    "`keras_actgrad.insert_probes(discriminator)` before building the "
    "model), or select their layers with `layers=`. Received: a custom "
    "`train_step` whose backward passes cross no tap."
)


def order_of(label: str, keys: dict[tuple[int, str], str]) -> list[str]:
    """The keys of the pass labelled `label` (`<label>/<probe>`)."""
    return [key for key in keys.values() if key.startswith(f"{label}/")]


def base_path(path: str) -> str:
    return re.sub(r"@\d+$", "", path)


@dataclasses.dataclass(eq=False)
class Pass:
    """One backward pass of a custom training step."""

    index: int
    # `id`s of the gradient tensors it returned (matched at `apply`).
    outputs: set[int] = dataclasses.field(default_factory=set)
    # Labels of the optimizers that applied its gradients.
    optimizers: list[str] = dataclasses.field(default_factory=list)

    def open(self, scopes: list[Pass]) -> bool:
        return any(scope is self for scope in scopes)


def no_scale() -> None:
    # A custom step's taps: the gradients of the loss it differentiates.
    return None


def held_optimizers(model: keras.Model) -> list[tuple[str, Any]]:
    """The optimizers the model holds, each labelled by its attribute name."""
    found: dict[int, tuple[str, Any]] = {}
    for name, value in vars(model).items():
        if isinstance(value, keras.optimizers.Optimizer) and id(value) not in found:
            found[id(value)] = (name.lstrip("_") or name, value)
    return list(found.values())


def optimizer_variables(optimizer: Any) -> list[Any]:
    """The trainable variables `optimizer` was built for, in its order.

    Keras 3.15.1 keeps them in `BaseOptimizer._trainable_variables` (set by
    `build`), with no public twin; `stateless_apply` takes their values in
    that order. (tests/test_custom_step.py fails loudly if it moves.)
    """
    return list(getattr(optimizer, "_trainable_variables", None) or [])


def wrap_backward(trace: Any, original: Any, kind: str) -> Any:
    """`original`, run inside a `trace.backward_pass()` scope.

    `kind`: `"call"`, the function takes the backward pass and returns the
    gradients (`tape.gradient`, `torch.autograd.grad`); `"transform"`, it
    returns a function that does (`jax.grad`); `"vjp"`, it returns
    `(outputs, pullback, ...)` and the pullback does (`jax.vjp`).
    """

    def scoped(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with trace.backward_pass() as current:
                result = function(*args, **kwargs)
            current.outputs.update(
                id(leaf) for leaf in keras.tree.flatten(result) if leaf is not None
            )
            return result

        return call

    if kind == "call":
        return scoped(original)
    if kind == "transform":

        def transform(*args: Any, **kwargs: Any) -> Any:
            return scoped(original(*args, **kwargs))

        return transform

    def vjp(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        return (result[0], scoped(result[1]), *result[2:])

    return vjp


def observer(
    trace: Any,
    label: str,
    optimizer: Any,
    observe: bool,
    scale_of: Callable[[Any], Callable[[], Tensor | None]],
) -> Callable[..., Any]:
    """`optimizer.apply` (or `stateless_apply`) observed for `trace`."""
    backend = step_hooks()
    scale = scale_of(optimizer)

    def paths(count: int) -> list[str]:
        names = [v.path for v in optimizer_variables(optimizer)]
        if len(names) != count:
            names = [f"{label}/variable_{i}" for i in range(count)]
        return names

    if backend.stateless:
        original_stateless = optimizer.stateless_apply

        def stateless_apply(
            optimizer_variables: Any, grads: Any, trainable_variables: Any
        ) -> Any:
            trace.applied(label, list(grads))
            new_trainable, new_optimizer = original_stateless(
                optimizer_variables, grads, trainable_variables
            )
            if observe:
                trace.observe(
                    paths(len(list(grads))),
                    list(grads),
                    list(trainable_variables),
                    list(new_trainable),
                    scale(),
                    accumulate=True,
                )
            return new_trainable, new_optimizer

        return stateless_apply

    original = optimizer.apply

    def apply(grads: Any, trainable_variables: Any = None) -> Any:
        grads = list(grads)
        variables = (
            optimizer_variables(optimizer)
            if trainable_variables is None
            else list(trainable_variables)
        )
        trace.applied(label, grads)
        factor = scale()
        old = [backend.copy(v.value) for v in variables] if observe else []
        result = original(grads, trainable_variables)
        if observe:
            trace.observe(
                [v.path for v in variables],
                grads,
                old,
                [v.value for v in variables],
                factor,
                accumulate=True,
            )
        return result

    return apply
