"""The monitored step under `keras.distribution` on JAX: nothing to combine.

`keras.distribution` (`DataParallel`, `ModelParallel`) shards the arrays of
one `jit`-compiled program, whose reductions are over the global arrays:
the monitor's statistics are the global batch's as they stand, in one
process or in several whose device mesh spans them all (multi-host; the
step's vector is replicated on every device: `processes_jax.replicated`).
Several processes without such a distribution each train on their own.
"""

from __future__ import annotations

import keras

from keras_actgrad._backends.base import OneProgram
from keras_actgrad._backends.processes_jax import unsupported


class JaxReplicas(OneProgram):
    @staticmethod
    def unsupported(model: keras.Model) -> str | None:
        return unsupported()
