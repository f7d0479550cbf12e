"""Which distributed setups the monitored step reports on the global batch.

- TensorFlow: `tf.distribute.MirroredStrategy` (one process, several
  replicas): every replica gathers the tapped tensors of all replicas and
  sums the weight gradients (`_backends/replicas_tensorflow.py`).
- JAX: `keras.distribution.DataParallel` and `ModelParallel` in one
  process: one `jit` program over sharded global arrays, whose reductions
  are global already.

Anything else distributed is refused before the first step, rather than
reporting one replica's or one process's share of the batch.
"""

from __future__ import annotations

import keras

from keras_actgrad._backends import replicas

SUPPORTED = (
    "`tf.distribute.MirroredStrategy` (TensorFlow backend) and "
    "`keras.distribution.DataParallel` or `ModelParallel` in one process "
    "(JAX backend)"
)


def check_distribution(model: keras.Model) -> None:
    """Raises a ValueError for a distributed setup the monitor cannot combine."""
    distribution = keras.distribution.distribution()
    backend = keras.backend.backend()
    where = None
    if distribution is not None and not (
        backend == "jax"
        and isinstance(
            distribution,
            (keras.distribution.DataParallel, keras.distribution.ModelParallel),
        )
    ):
        where = (
            f"keras.distribution {type(distribution).__name__} on the {backend} backend"
        )
    if where is None:
        where = replicas().unsupported(model)
    if where is not None:
        raise ValueError(
            "`GradientMonitor` reports the statistics of the global batch "
            f"under {SUPPORTED} only; under this setup they would be those of "
            "one replica's or one process's share of the batch. Train under "
            "one of those setups or on one device, or use "
            "`ActivationGradientCallback` (a separate probe pass). "
            f"Received: {where}."
        )
