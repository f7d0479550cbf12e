"""Registers `GradientProbe` with Keras's serialization as soon as Keras exists.

`import keras_actgrad` imports Keras lazily (reading logs needs neither Keras
nor its backend), but a saved model's probes deserialize by the name that
`keras_actgrad._probe` registers. `register_probes` imports that module now
if Keras is imported already (it then costs nothing), and otherwise right
after Keras's own import completes, whoever imports it: the idiom
`import keras_actgrad` (for its registration), `import keras`,
`keras.saving.load_model(...)` keeps working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_PROBE_MODULE = "keras_actgrad._probe"


def register_probes() -> None:
    if "keras" in sys.modules:
        importlib.import_module(_PROBE_MODULE)
    elif not any(isinstance(f, _AfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds `keras` with the other finders, then imports the probe module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # once; the real finders find Keras
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            importlib.import_module(_PROBE_MODULE)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
