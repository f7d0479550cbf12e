"""Which distributed setups the monitored step reports on the global batch.

- TensorFlow: `tf.distribute.MirroredStrategy` (one process, several
  replicas): every replica gathers the tapped tensors of all replicas and
  sums the weight gradients (`_backends/replicas_tensorflow.py`).
- JAX: `keras.distribution.DataParallel` and `ModelParallel`, in one
  process or in several (multi-host) whose device mesh spans them all: one
  `jit` program over sharded global arrays, whose reductions are global
  already (`_backends/processes_jax.py`).

Anything else distributed is refused before the first step, rather than
reporting one replica's or one process's share of the batch.
"""

from __future__ import annotations

import keras

from keras_actgrad._backends import processes, replicas

SUPPORTED = (
    "`tf.distribute.MirroredStrategy` (TensorFlow backend) and "
    "`keras.distribution.DataParallel` or `ModelParallel` in one process, or "
    "in several whose device mesh spans every process (JAX backend)"
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


def check_processes(who: str) -> None:
    """Raises a ValueError for several JAX processes without one global program.

    Under `jax.distributed` without a `keras.distribution` whose device mesh
    spans every process, each process trains on its own, and a probe pass
    would measure one process's model on its own batch.
    """
    where = processes().unsupported()
    if where is not None:
        raise ValueError(
            f"{who} measures the global batch of several JAX processes only "
            "under a `keras.distribution` whose device mesh spans every "
            "process (e.g. `keras.distribution.set_distribution("
            "keras.distribution.DataParallel())` on every process, before "
            "the model is built); without one, each process trains and "
            f"measures on its own. Received: {where}."
        )
