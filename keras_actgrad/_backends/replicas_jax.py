"""The monitored step under `keras.distribution` on JAX: nothing to combine.

`keras.distribution` (`DataParallel`, `ModelParallel`) shards the arrays of
one `jit`-compiled program, whose reductions are over the global arrays:
the monitor's statistics are the global batch's as they stand. Several JAX
processes (multi-host) are refused: the monitor reads its values on one
host, and that is untested.
"""

from __future__ import annotations

import jax
import keras

from keras_actgrad._backends.base import OneProgram


class JaxReplicas(OneProgram):
    @staticmethod
    def unsupported(model: keras.Model) -> str | None:
        count = jax.process_count()
        return f"{count} JAX processes" if count > 1 else None
