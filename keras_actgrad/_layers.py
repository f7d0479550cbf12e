"""Any layer's output as a tap: layer selection and in-place measurement.

`activation_gradients(model, x, y, layers=...)` and
`ActivationGradientCallback(..., layers=...)` measure at the outputs of the
selected layers, at any depth (sublayers of custom layers, KerasHub blocks,
`MultiHeadAttention`, subclassed models), with no `GradientProbe` and no
rebuilt model.

How: while the pass is traced, each selected layer gets an *instance*
attribute `call` (or `quantized_call` for a quantized layer) that runs the
class's `call` and sends its output through the pass's tap, the same tap a
`GradientProbe` calls. Keras 3.15.1's `Operation.__call__` looks up
`self.call` on the instance at every call (ops/operation.py, `__call__`),
after `Layer.__call__` has resolved `training` and the masks from the
signature cached at construction (`Layer._call_signature`, read from the
class's `call`), and before it attaches the output mask, records the
activity regularizer and adds a graph node: so the layer behaves as before
in every other way, in Functional, Sequential and subclassed models, on
every backend. (Keras itself overrides `build` per instance, in
`Layer.__new__`.) The attribute is set with `object.__setattr__`, past
Keras's, TensorFlow's and PyTorch's attribute tracking, and removed when the
pass is traced: nothing stays on the model (same object, class, `__dict__`,
weights, compiled state and saved file).

One difference with a probe placed after the layer: the layer's own
`activity_regularizer` reads the tapped output, so its gradient (part of the
loss) is included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import keras

from keras_actgrad._context import tapping

Layers: TypeAlias = (
    str
    | type
    | keras.layers.Layer
    | Callable[[keras.layers.Layer], bool]
    | Sequence[str | type | keras.layers.Layer | Callable[[keras.layers.Layer], bool]]
)


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A selected layer and the key its measurements are reported under."""

    name: str
    layer: keras.layers.Layer


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The sublayers a layer tracks, private attributes included.

    Keras 3.15.1 keeps them in `Layer._layers` (MultiHeadAttention's
    `_query_dense`, KerasHub's `_self_attention_layer`, a Functional
    model's layers); there is no public twin (`Model.layers` is one level
    and skips private attributes of subclassed layers). tests/test_inplace.py
    `test_children_of_keras_layers` fails if it moves.
    """
    children = getattr(layer, "_layers", None)
    if children is None:
        return []
    return [child for child in children if isinstance(child, keras.layers.Layer)]


def _walk(model: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """(tracking path, layer) of every sublayer at any depth, each once."""
    found: list[tuple[str, keras.layers.Layer]] = []
    seen: set[int] = {id(model)}

    def visit(layer: keras.layers.Layer, prefix: str) -> None:
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}" if prefix else child.name
            found.append((path, child))
            visit(child, path)

    visit(model, "")
    return found


def layer_keys(model: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """Every sublayer of `model` (inputs excluded) with its key.

    The key is the layer's Keras `path` (`transformer_layer_0/self_attention
    /query`); a layer that has none (never built) or shares it with another
    layer (e.g. equally named layers of two nested Functional models) is
    keyed by its tracking path from `model` (`block/dropout`).
    """
    layers = [
        (path, layer)
        for path, layer in _walk(model)
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    paths = [layer.path for _, layer in layers]
    keys = []
    for (tracking, layer), path in zip(layers, paths, strict=True):
        unique = path is not None and paths.count(path) == 1
        keys.append((path if unique else tracking, layer))
    return keys


def _pattern(pattern: str) -> re.Pattern[str]:
    """A glob on paths: `*` and `?` stay within a segment, `**` crosses them."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts) + r"\Z")


def _names(model: keras.layers.Layer, key: str, layer: keras.layers.Layer) -> set[str]:
    """What a string selects a layer by: its key, its name, and its key
    relative to `model` (a subclassed model's paths start with its name)."""
    names = {key, layer.name}
    prefix = f"{model.path or model.name}/"
    if key.startswith(prefix):
        names.add(key[len(prefix) :])
    return names


def _items(layers: Any) -> list[Any]:
    if isinstance(layers, (str, type, keras.layers.Layer)):
        return [layers]
    if isinstance(layers, (list, tuple)):
        return list(layers)
    if callable(layers):
        return [layers]
    raise ValueError(
        "`layers` must be a layer name or path, a glob pattern on paths "
        "(e.g. 'transformer_layer_*' or '*/self_attention/query'), a layer "
        "class, a layer object, a predicate `layer -> bool`, or a list of "
        f"these. Received: layers={layers!r}."
    )


def select_layers(model: keras.Model, layers: Layers) -> tuple[Site, ...]:
    """The sites `layers` selects in `model`, in tracking (forward) order.

    Raises:
        ValueError: for an item that selects nothing (with close matches),
            or an item of an unknown kind.
    """
    candidates = layer_keys(model)
    chosen: set[int] = set()
    missing = []
    for item in _items(layers):
        if isinstance(item, str):
            pattern = _pattern(item)
            hits = [
                layer
                for key, layer in candidates
                if any(pattern.match(n) for n in _names(model, key, layer))
            ]
        elif isinstance(item, type):
            hits = [layer for _, layer in candidates if isinstance(layer, item)]
        elif isinstance(item, keras.layers.Layer):
            hits = [layer for _, layer in candidates if layer is item]
        elif callable(item):
            hits = [layer for _, layer in candidates if item(layer)]
        else:
            _items(item)  # raises
            hits = []
        if not hits:
            missing.append(item)
        chosen.update(id(layer) for layer in hits)
    if missing:
        keys = [key for key, _ in candidates]
        hints = []
        for item in missing:
            if isinstance(item, str):
                close = difflib.get_close_matches(item, keys, n=5, cutoff=0.4)
                hints.append(f"{item!r}: close matches {close}")
            else:
                hints.append(f"{item!r}: no layer")
        shown = keys if len(keys) <= 30 else keys[:30] + ["..."]
        raise ValueError(
            f"`layers` selects no layer of model '{model.name}' for "
            f"{len(missing)} item(s): {'; '.join(hints)}. Select layers by "
            "name or path (`layer.path`), a glob on paths ('*' within a "
            "path segment, '**' across segments), a class, a layer object or "
            f"a predicate. Layer paths: {shown}. Received: layers={layers!r}."
        )
    return tuple(Site(key, layer) for key, layer in candidates if id(layer) in chosen)


def selection_key(sites: Sequence[Site]) -> tuple[tuple[str, int], ...]:
    """What identifies a selection in the cache of compiled passes."""
    return tuple((site.name, id(site.layer)) for site in sites)


def _site_name(site: Site, index: int | None) -> Any:
    # What a tap reads of a probe: its name.
    return types.SimpleNamespace(
        name=site.name if index is None else f"{site.name}:{index}"
    )


def _is_tensor(value: Any) -> bool:
    return value is not None and keras.ops.is_tensor(value)


def _keep_mask(source: Any, target: Any) -> None:
    """Carries a mask the layer's `call` attached to its output.

    Keras 3.15.1 keeps masks in the tensor attribute `_keras_mask`
    (TensorFlow and PyTorch tensors; JAX arrays take no attribute and Keras
    keeps theirs in a private table). `Layer.__call__` attaches
    `compute_mask`'s mask to the tapped output afterwards in every case.
    """
    mask = getattr(source, "_keras_mask", None)
    if mask is not None and getattr(target, "_keras_mask", None) is None:
        try:
            target._keras_mask = mask
        except AttributeError:
            pass


def _tapped_call(original: Callable[..., Any], site: Site, tap: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        outputs = original(*args, **kwargs)
        if not isinstance(outputs, (list, tuple, dict)):
            if not _is_tensor(outputs):
                return outputs
            tapped = tap(_site_name(site, None), outputs)
            _keep_mask(outputs, tapped)
            return tapped
        # Several outputs (an RNN's states, attention and its scores): one
        # tap per tensor, `key:<index>` in flattened order.
        leaves = keras.tree.flatten(outputs)
        new = []
        for index, leaf in enumerate(leaves):
            if _is_tensor(leaf):
                tapped = tap(_site_name(site, index), leaf)
                _keep_mask(leaf, tapped)
                new.append(tapped)
            else:
                new.append(leaf)
        return keras.tree.pack_sequence_as(outputs, new)

    return call


_ABSENT = object()


def _tapped_remat(original: Callable[..., Any], site: Site, tap: Any) -> Any:
    """`rematerialized_call` whose function taps the output of the remat'd call."""

    def rematerialized_call(function: Any, *args: Any, **kwargs: Any) -> Any:
        return _tapped_call(original(function, *args, **kwargs), site, tap)

    return rematerialized_call


# Keras 3.15.1 `Operation.__init__` keeps a layer's `keras.RematScope` mode
# in the private `_remat_mode` (no public twin), which `Operation.__call__`
# reads at every call to wrap `call` in `rematerialized_call`.
# tests/test_accelerators.py `test_keras_remat_attribute` fails if it moves.
_REMAT = "_remat_mode"


@contextlib.contextmanager
def remat_outside_taps(
    model: keras.layers.Layer, sites: Sequence[Site] = ()
) -> Iterator[None]:
    """Keeps every tap of a pass outside rematerialized (checkpointed) calls.

    Under `keras.RematScope` a layer's call runs in a checkpoint (on JAX,
    `jax.checkpoint`), which a tap inside must not leak values out of. In
    the block: a layer that holds a tap inside it (a `GradientProbe`, or a
    selected layer of `sites`, at any depth below it: a model, a block)
    and a `GradientProbe` itself (an identity: nothing to rematerialize)
    run without rematerialization; a selected layer with no tap inside
    keeps its own, tapped on its output (`tapping_layers`). Every other
    layer keeps its rematerialization. Enter it inside the traced function.
    """
    from keras_actgrad._probe import GradientProbe

    targets = {id(site.layer) for site in sites}
    if not sites:
        targets = {
            id(layer) for _, layer in _walk(model) if isinstance(layer, GradientProbe)
        }
    holders: dict[int, keras.layers.Layer] = {}
    seen: set[int] = set()

    def visit(layer: keras.layers.Layer, stack: list[keras.layers.Layer]) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if id(layer) in targets:
            holders.update((id(outer), outer) for outer in stack)
            if isinstance(layer, GradientProbe):
                holders[id(layer)] = layer
        for child in _children(layer):
            visit(child, [*stack, layer])

    visit(model, [])
    changed = [
        (layer, layer.__dict__[_REMAT])
        for layer in holders.values()
        if layer.__dict__.get(_REMAT)
    ]
    try:
        for layer, _ in changed:
            object.__setattr__(layer, _REMAT, None)
        yield
    finally:
        for layer, mode in changed:
            object.__setattr__(layer, _REMAT, mode)


@contextlib.contextmanager
def tapping_layers(sites: Sequence[Site], tap: Any) -> Iterator[None]:
    """Routes the outputs of the selected layers through `tap` in the block.

    Enter it inside the traced function: the taps are part of the trace,
    and the layers are as they were once the block exits.
    """
    installed: list[tuple[keras.layers.Layer, str, Any]] = []
    try:
        for site in sites:
            layer = site.layer
            if any(layer is done for done, _, _ in installed):
                continue
            # A quantized layer runs `quantized_call` instead of `call`
            # (Keras 3.15.1 `Operation.__call__`).
            quantized = getattr(layer, "quantization_mode", None) is not None
            attribute = "quantized_call" if quantized else "call"
            if getattr(layer, _REMAT, None):
                # Rematerialized (`keras.RematScope`): the tap goes on the
                # output of the rematerialized call, outside the checkpoint
                # (a tap inside would leak the checkpoint's tracers).
                attribute = "rematerialized_call"
            previous = layer.__dict__.get(attribute, _ABSENT)
            original = getattr(layer, attribute)
            if attribute == "rematerialized_call":
                replacement = _tapped_remat(original, site, tap)
            else:
                replacement = _tapped_call(original, site, tap)
            object.__setattr__(layer, attribute, replacement)
            installed.append((layer, attribute, previous))
        yield
    finally:
        for layer, attribute, previous in reversed(installed):
            if previous is _ABSENT:
                object.__delattr__(layer, attribute)
            else:
                object.__setattr__(layer, attribute, previous)


def reached(site_name: str, tap_names: Sequence[str]) -> bool:
    """Whether a pass that reached `tap_names` reached the site's layer."""
    return any(
        name == site_name or name.startswith((f"{site_name}@", f"{site_name}:"))
        for name in tap_names
    )


# Selections for transformer models (KerasHub and others).


def _is_attention(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention) or type(
        layer
    ).__name__.endswith("Attention")


def attention_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every attention layer of `model` (outermost ones), at any depth.

    An attention layer is a `keras.layers.MultiHeadAttention` or a layer
    whose class name ends in `Attention` (KerasHub's `CachedGemmaAttention`,
    `LlamaAttention`, `T5MultiHeadAttention`, ...). Its output is the
    attention block's output, after the output projection.

    Example:

    ```python
    keras_actgrad.activation_gradients(
        model, x, y, layers=keras_actgrad.attention_layers(model)
    )
    ```
    """
    found: list[keras.layers.Layer] = []

    def visit(layer: keras.layers.Layer) -> None:
        for child in _children(layer):
            if _is_attention(child):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return list(dict.fromkeys(found))


def transformer_blocks(model: keras.Model) -> list[keras.layers.Layer]:
    """Every transformer block of `model`: the layers that hold an attention
    layer as a direct sublayer (KerasHub's `TransformerEncoder`,
    `GemmaDecoderBlock`, `ViTEncoderBlock`, ...), in forward order.
    """
    blocks = []
    for _, layer in _walk(model):
        if not _is_attention(layer) and any(
            _is_attention(child) for child in _children(layer)
        ):
            blocks.append(layer)
    return blocks


def mlp_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The feed-forward (MLP) sublayers of every transformer block.

    In each block: a direct sublayer whose name contains `mlp` (ViT's
    `MLP` layer) if there is one, else the block's direct `Dense` and
    `EinsumDense` sublayers (the intermediate, gate and output projections:
    BERT's `feedforward_*_dense`, Gemma's `ffw_*`, T5's `*_projector`).
    """
    found = []
    dense = (keras.layers.Dense, keras.layers.EinsumDense)
    for block in transformer_blocks(model):
        children = [c for c in _children(block) if not _is_attention(c)]
        named = [c for c in children if "mlp" in c.name]
        found.extend(named or [c for c in children if isinstance(c, dense)])
    return found


@contextlib.contextmanager
def taps_in(model: keras.Model, sites: Sequence[Site], tap: Any) -> Iterator[None]:
    """Routes the taps of a pass or step through `tap` in the block.

    The model's `GradientProbe`s, or, if `sites` are given, the outputs of
    those layers (`tapping_layers`), with rematerialized calls kept outside
    the taps (`remat_outside_taps`).
    """
    with remat_outside_taps(model, sites):
        if sites:
            with tapping_layers(sites, tap):
                yield
        else:
            with tapping(tap):
                yield
