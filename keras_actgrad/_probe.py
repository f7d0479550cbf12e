"""`GradientProbe` and the functions that find, insert and strip probes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import keras

from keras_actgrad._context import current_tap

LayerSelector: TypeAlias = (
    str | type | Sequence[str | type] | Callable[[keras.layers.Layer], bool] | None
)


@keras.saving.register_keras_serializable(package="keras_actgrad")
class GradientProbe(keras.layers.Layer):
    """Marks a tensor whose loss gradient keras-actgrad measures.

    An identity layer: its output is its input, bit for bit, for any shape
    and floating dtype (it never autocasts). It has no weights and passes
    masks through. Outside a probe pass it costs nothing: `call` returns its
    input. During a probe pass (`activation_gradients`, or the
    `ActivationGradientCallback`), the engine records the probe's output and
    the gradient of the loss with respect to it: what flows back *through the
    probe*. Uses of the same tensor that bypass the probe (a skip connection
    reading the previous layer directly, that layer's activity regularizer)
    are not counted.

    Args:
        name: String, the probe's name. It keys the results and the logs
            (`actgrad/<name>/<statistic>`). Defaults to a unique
            `gradient_probe_N`.
        **kwargs: Base layer keyword arguments (`dtype`, ...).

    Call arguments:
        inputs: A tensor.

    Returns:
        `inputs`, unchanged.

    Example:

    ```python
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras_actgrad.GradientProbe(name="hidden")(h)
    outputs = keras.layers.Dense(1)(h)
    model = keras.Model(inputs, outputs)
    ```
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        kwargs["autocast"] = False
        super().__init__(name=name, **kwargs)
        self.supports_masking = True
        self.built = True

    def call(self, inputs: Any) -> Any:
        self._check_single_tensor(inputs)
        tap = current_tap()
        if tap is None:
            return inputs
        return tap(self, inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any) -> Any:
        self._check_single_tensor(inputs)
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype, sparse=inputs.sparse)

    def _check_single_tensor(self, inputs: Any) -> None:
        if isinstance(inputs, (list, tuple, dict)):
            raise ValueError(
                f"`GradientProbe` '{self.name}' measures one tensor, but it was "
                f"called on a {type(inputs).__name__} of {len(inputs)}. Call one "
                "probe per tensor, e.g. `[GradientProbe(name=f'state_{i}')(t) "
                "for i, t in enumerate(outputs)]` (`insert_probes` does this for "
                f"layers with several outputs). Received: inputs={inputs!r}."
            )


def _is_functional(model: Any) -> bool:
    """True for Functional models (including functional-style subclasses)."""
    if isinstance(model, keras.Sequential):
        return False
    return isinstance(model, keras.Model) and any(
        cls.__name__ == "Functional" for cls in type(model).__mro__
    )


def _is_graph_model(model: Any) -> bool:
    return isinstance(model, keras.Sequential) or _is_functional(model)


def _sublayers(layer: Any) -> list[keras.layers.Layer]:
    """Direct sublayers of `layer`, in the order the layer tracks them."""
    if isinstance(layer, keras.Model) and _is_graph_model(layer):
        return list(layer.layers)
    found: list[keras.layers.Layer] = []
    seen: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, keras.layers.Layer):
            if id(value) not in seen and value is not layer:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for name, value in vars(layer).items():
        if name.startswith("_") and name not in ("_layers",):
            continue
        visit(value)
    return found


def _walk(layer: Any, seen: set[int]) -> Iterator[keras.layers.Layer]:
    for sub in _sublayers(layer):
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        yield sub
        yield from _walk(sub, seen)


def _graph_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """The layers of a graph model and of the graph models nested in it."""
    for layer in model.layers:
        yield layer
        if _is_graph_model(layer):
            yield from _graph_layers(layer)


def _is_probe_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and (
        entry.get("registered_name") == "keras_actgrad>GradientProbe"
        or entry.get("class_name") == "GradientProbe"
    )


def _histories(value: Any) -> Iterator[str]:
    """Names of the layers a serialized node's arguments come from."""
    if isinstance(value, dict):
        history = value.get("keras_history")
        if isinstance(history, (list, tuple)) and history:
            yield str(history[0])
        for item in value.values():
            yield from _histories(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _histories(item)


def _probed_layer_names(model: keras.Model) -> set[str]:
    """Names of the layers of this graph level whose output feeds a probe.

    Read from the model's config (the graph as serialized), which names each
    probe's producer in *this* model even when layers are shared with others.
    """
    try:
        entries = model.get_config().get("layers", [])
    except (NotImplementedError, TypeError, ValueError):
        return set()
    names: set[str] = set()
    if isinstance(model, keras.Sequential):
        previous = None
        for entry in entries:
            if _is_probe_entry(entry) and previous is not None:
                names.add(previous)
            previous = entry.get("config", {}).get("name")
        return names
    for entry in entries:
        if _is_probe_entry(entry):
            names.update(_histories(entry.get("inbound_nodes", [])))
    return names


def find_probes(model: keras.layers.Layer) -> list[GradientProbe]:
    """Lists the `GradientProbe` layers of a model, in forward order.

    Probes inside nested models and layers are included. For Sequential and
    Functional models the order is the order of the computation graph; for
    subclassed models it is the order in which `__init__` assigns the layers
    (the usual forward order). The probe pass itself always reports results
    in the order the forward pass reaches the probes.

    Args:
        model: A Keras model or layer.

    Returns:
        A list of `GradientProbe` instances, each listed once.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`find_probes` expects a Keras model or layer. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    return [layer for layer in _walk(model, set()) if isinstance(layer, GradientProbe)]


def _has_weights(layer: keras.layers.Layer) -> bool:
    return len(layer.weights) > 0


def _selector(layers: LayerSelector, model: keras.Model) -> Callable[[Any], bool]:
    if layers is None:
        return lambda layer: (
            isinstance(layer, keras.layers.Layer)
            and _has_weights(layer)
            and not _is_graph_model(layer)
        )
    if callable(layers) and not isinstance(layers, type):
        return layers
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    names = {item for item in items if isinstance(item, str)}
    classes = tuple(item for item in items if isinstance(item, type))
    bad = [item for item in items if not isinstance(item, (str, type))]
    if bad:
        raise ValueError(
            "`layers` must be layer names, layer classes, or a predicate "
            f"`layer -> bool`. Received: layers={layers!r}."
        )
    known = {layer.name for layer in _graph_layers(model)}
    unknown = sorted(names - known)
    if unknown:
        inner = sorted(set(unknown) & {layer.name for layer in _walk(model, set())})
        hint = (
            f" {inner} are sublayers inside a layer, not layers of the model's "
            "graph: `insert_probes` places probes between graph layers only. "
            "To probe inside a layer, call a `GradientProbe` in its `call()`."
            if inner
            else ""
        )
        raise ValueError(
            f"`insert_probes` found no layer named {unknown} in model "
            f"'{model.name}'.{hint} Pass names of existing layers, layer "
            f"classes, or a predicate. Available layer names: {sorted(known)}. "
            f"Received: layers={layers!r}."
        )
    inputs = sorted(
        layer.name
        for layer in _walk(model, set())
        if isinstance(layer, keras.layers.InputLayer)
        and (layer.name in names or issubclass(keras.layers.InputLayer, classes))
    )
    if inputs:
        raise ValueError(
            f"`insert_probes` places probes after layers, and {inputs} are "
            f"inputs of model '{model.name}'. To measure the gradient with "
            "respect to an input, put a probe on it where the model is built: "
            "`inputs = keras.Input(...)`, then "
            "`h = keras_actgrad.GradientProbe(name='input_probe')(inputs)` and "
            f"build the rest on `h`. Received: layers={layers!r}."
        )
    return lambda layer: (
        layer.name in names or (bool(classes) and isinstance(layer, classes))
    )


def _compile_like(new: keras.Model, old: keras.Model) -> keras.Model:
    """Compiles `new` as `old` was, sharing `old`'s optimizer object."""
    if not getattr(old, "compiled", False):
        return new
    holder = getattr(old, "_compile_config", None)
    config = dict(getattr(holder, "config", {}) or {})
    if not config:
        new.compile_from_config(old.get_compile_config())
        return new
    config["optimizer"] = old.optimizer
    new.compile(**config)
    return new


def _require_built(model: keras.Model, function: str) -> None:
    if not model.built or (_is_graph_model(model) and not model.inputs):
        raise ValueError(
            f"`{function}` needs a built model, but model '{model.name}' has not "
            "been built yet. Give it an input shape (`keras.Input(...)` as first "
            "layer) or call it once on a batch of data before. "
            f"Received: model '{model.name}' with built={model.built}."
        )


def _rebuild(
    model: keras.Model,
    replace: Callable[[keras.layers.Layer], keras.layers.Layer],
    skip: Callable[[keras.layers.Layer], bool],
    after: Callable[[keras.layers.Layer, int | None], GradientProbe | None],
    keep_names: bool = False,
) -> keras.Model:
    """Rebuilds a Sequential or Functional model with the same layer objects.

    `replace(layer)` returns the layer to use in place of `layer` (itself, or
    a rebuilt nested model); `skip(layer)` drops the layer (its input passes
    through); `after(layer, index)` returns a probe to call right after
    `layer` (on its output `index` if it has several outputs, else None).
    With `keep_names`, a rebuilt Functional model whose outputs Keras would
    name after probes is a `ProbedModel`, which keeps the original names
    through `save` and `load`.
    """
    cache: dict[int, keras.layers.Layer] = {}

    def replaced(layer: keras.layers.Layer) -> keras.layers.Layer:
        if id(layer) not in cache:
            cache[id(layer)] = replace(layer)
        return cache[id(layer)]

    if isinstance(model, keras.Sequential):
        new_layers: list[keras.layers.Layer] = []
        for layer in model.layers:
            if skip(layer):
                continue
            new_layer = replaced(layer)
            new_layers.append(new_layer)
            probe = after(new_layer, None)
            if probe is not None:
                new_layers.append(probe)
        spec = model.inputs[0]
        inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype)
        return keras.Sequential([inputs, *new_layers], name=model.name)

    def call_function(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(layer, keras.layers.Layer):
            # A Keras operation as a graph node (`x + y`, `x[..., 0]`,
            # `ops.multiply`): no weights, no probe; it passes through.
            return layer(*args, **kwargs)
        if skip(layer):
            return args[0]
        outputs = layer(*args, **kwargs)
        if not isinstance(outputs, (list, tuple, dict)):
            probe = after(layer, None)
            return outputs if probe is None else probe(outputs)
        # Several outputs (e.g. an RNN's states): one probe per tensor.
        leaves = keras.tree.flatten(outputs)
        probed = []
        for index, tensor in enumerate(leaves):
            probe = after(layer, index)
            probed.append(tensor if probe is None else probe(tensor))
        return keras.tree.pack_sequence_as(outputs, probed)

    new = keras.models.clone_model(
        model, clone_function=replaced, call_function=call_function
    )
    # Keras names outputs after their layers; keep the original names so
    # dict-keyed losses, metrics and `y` keep working.
    derived = list(new.output_names)
    names = list(model.output_names)
    if keep_names and derived != names:
        # A probe follows an output layer: a reload would name the output
        # after the probe. `ProbedModel` stores the names.
        new = ProbedModel(new.input, new.output, name=new.name, output_names=names)
    new.output_names = names
    return new


@keras.saving.register_keras_serializable(package="keras_actgrad")
class ProbedModel(keras.Model):
    """A Functional model that keeps its output names through `save`/`load`.

    Keras names a Functional model's outputs after the layers that produce
    them, also when it rebuilds a saved model. When `insert_probes` puts a
    probe after an output layer, the output would be renamed after the
    probe (`"logits_probe"`) on reload, and losses keyed by the original
    output name would no longer match. This subclass stores the names in
    its config. It behaves as the Functional model it wraps in every other
    way (same layers, same weights, same calls).
    """

    def __init__(
        self, *args: Any, output_names: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if output_names is not None:
            self.output_names = list(output_names)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["output_names"] = list(self.output_names)
        return config


def insert_probes(model: keras.Model, layers: LayerSelector = None) -> keras.Model:
    """Returns `model` with a `GradientProbe` after selected layers.

    The new model shares the original's layer objects (same weights, no copy)
    and is compiled as the original was, with the same optimizer, so `fit`
    works right away. Nested Sequential and Functional models are rebuilt
    with probes inside them. Each probe is named `<layer name>_probe`; a
    layer with several outputs (e.g. an RNN returning its states) gets one
    probe per output tensor, `<layer name>_<index>_probe`. A layer already
    followed by a probe gets no second one, so inserting twice changes
    nothing.

    Args:
        model: A built Sequential or Functional model.
        layers: Which layers get a probe after them: a layer name, a layer
            class, a list of names and classes, or a predicate
            `layer -> bool`. Defaults to every layer that has weights.

    Returns:
        A new `keras.Model` with probes.

    Raises:
        ValueError: for a subclassed model (place `GradientProbe` in `call()`
            yourself), an unbuilt model, an unknown layer name, a model input,
            or a selection that matches no layer.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    probed = keras_actgrad.insert_probes(model)
    [p.name for p in keras_actgrad.find_probes(probed)]  # ['dense_probe']
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`insert_probes` expects a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}."
        )
    if not _is_graph_model(model):
        raise ValueError(
            f"`insert_probes` cannot rewrite the subclassed model '{model.name}': "
            "its forward pass is Python code, not a graph of layers. Place "
            "`keras_actgrad.GradientProbe` layers yourself: create them in "
            "`__init__` (e.g. `self.hidden_probe = GradientProbe(name='hidden')`) "
            "and call them on the tensors to measure in `call()` (e.g. "
            "`x = self.hidden_probe(x)`). "
            f"Received: model of type {type(model).__name__}."
        )
    _require_built(model, "insert_probes")
    select = _selector(layers, model)
    used = {layer.name for layer in _walk(model, set())}

    def probe_name(layer: keras.layers.Layer, index: int | None) -> str:
        base = layer.name if index is None else f"{layer.name}_{index}"
        name = f"{base}_probe"
        counter = 1
        while name in used:
            counter += 1
            name = f"{base}_probe_{counter}"
        used.add(name)
        return name

    def insert(current: keras.Model) -> keras.Model:
        probed = _probed_layer_names(current)
        top = current is model

        def replace(layer: keras.layers.Layer) -> keras.layers.Layer:
            return insert(layer) if _is_graph_model(layer) else layer

        def after(layer: keras.layers.Layer, index: int | None) -> GradientProbe | None:
            if isinstance(layer, (GradientProbe, keras.layers.InputLayer)):
                return None
            if not select(layer):
                return None
            if layer.name in probed:  # already followed by a probe
                selected.append(layer.name)
                return None
            selected.append(layer.name)
            return GradientProbe(name=probe_name(layer, index))

        return _rebuild(current, replace, lambda layer: False, after, keep_names=top)

    selected: list[str] = []
    new = insert(model)
    if not selected:
        raise ValueError(
            f"`insert_probes` selected no layer of model '{model.name}', so it "
            "would place no probe. Select layers by name, class or predicate "
            "(the default selects every layer with weights). Available layer "
            f"names: {sorted(layer.name for layer in _graph_layers(model))}. "
            f"Received: layers={layers!r}."
        )
    return _compile_like(new, model)


def strip_probes(model: keras.Model) -> keras.Model:
    """Returns `model` without its `GradientProbe` layers.

    The inverse of `insert_probes`: same layer objects, same predictions,
    compiled as the original was. Nested Sequential and Functional models are
    stripped too.

    Args:
        model: A built Sequential or Functional model.

    Returns:
        A new `keras.Model` without probes.
    """
    if not isinstance(model, keras.Model) or not _is_graph_model(model):
        raise ValueError(
            "`strip_probes` rewrites Sequential and Functional models only. For "
            "a subclassed model, remove the `GradientProbe` calls from `call()` "
            "(they are identities and cost nothing outside a probe pass, so "
            f"leaving them is fine). Received: model of type {type(model).__name__}."
        )
    _require_built(model, "strip_probes")

    def strip(current: keras.Model) -> keras.Model:
        def replace(layer: keras.layers.Layer) -> keras.layers.Layer:
            return strip(layer) if _is_graph_model(layer) else layer

        return _rebuild(
            current,
            replace,
            lambda layer: isinstance(layer, GradientProbe),
            lambda layer, index: None,
        )

    return _compile_like(strip(model), model)
