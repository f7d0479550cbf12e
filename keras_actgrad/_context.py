"""The switch that turns probes on during a probe pass.

A probe pass installs a *tap*: a function `(probe, tensor) -> tensor` that
every `GradientProbe` calls while the switch is on. Outside a probe pass no tap
is installed and a probe returns its input untouched.

The tap is a module global, not a thread-local, on purpose: distribution
strategies may trace replica functions in other threads, and those traces must
see the tap of the probe pass that started them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

Tap = Callable[[Any, Any], Any]

_tap: Tap | None = None


def current_tap() -> Tap | None:
    """Returns the tap of the probe pass under way, or `None`."""
    return _tap


@contextlib.contextmanager
def tapping(tap: Tap) -> Iterator[None]:
    """Installs `tap` for the duration of the block."""
    global _tap
    previous = _tap
    _tap = tap
    try:
        yield
    finally:
        _tap = previous
