"""TensorBoard's entry point for keras-actgrad's dashboard (the ACTGRAD tab).

A module of its own, beside the `keras_actgrad` package rather than in it:
TensorBoard imports every plugin entry point when it starts, and an import
error there stops TensorBoard. The plugin imports neither Keras nor
TensorFlow (`keras_actgrad` imports its Keras-dependent modules on first
use), and this loader imports it in `load`, where TensorBoard would catch a
failure, log it and start without the tab. The plugin itself is
`keras_actgrad._dashboard.plugin.ActgradPlugin`.
"""

from __future__ import annotations

from typing import Any

from tensorboard.plugins import base_plugin

# Points of the `actgrad` plugin's tensors (the monitor's packed step
# values) TensorBoard keeps per run, unless `--samples_per_plugin` says.
SAMPLES = 1000


class ActgradLoader(base_plugin.TBLoader):
    """Loads `ActgradPlugin` when TensorBoard builds its plugins."""

    def fix_flags(self, flags: Any) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault("actgrad", SAMPLES)

    def load(self, context: Any) -> Any:
        from keras_actgrad._dashboard.plugin import ActgradPlugin

        return ActgradPlugin(context)
