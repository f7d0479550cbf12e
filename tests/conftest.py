"""Shared pytest configuration.

The suite runs once per Keras backend (`KERAS_BACKEND=tensorflow|jax|torch`,
see `tests/run_all_backends.py`). A test whose reference or subject only
exists on TensorFlow (a hand-split `tf.GradientTape`, `tf.distribute`) is
marked `@pytest.mark.requires_tensorflow(reason=...)` and skipped on the
other backends with that reason.
"""

from __future__ import annotations

import keras
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_tensorflow(reason): the test needs the TensorFlow backend; "
        "skipped with `reason` on the others",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("requires_tensorflow")
        if marker is None:
            continue
        reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
        item.add_marker(
            pytest.mark.skip(
                reason=f"TensorFlow only ({reason})" if reason else "TensorFlow only"
            )
        )
