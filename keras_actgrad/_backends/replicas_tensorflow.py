"""The monitored step under `tf.distribute.MirroredStrategy`: the global batch.

Keras runs its train step once per replica (`strategy.run`), each on its
share of the batch, with the loss divided by the number of replicas (so
each replica's backward pass yields the rows of the global batch's
gradient that belong to its examples), and the optimizer sums the
replicas' weight gradients (`ReplicaContext.all_reduce`) before it updates
the mirrored weights.

The monitor's statistics must be those of the global batch. Statistics such
as maxima, standard deviations, dead units or histograms do not combine from
per-replica values in general, so every replica gathers the tapped
activations and gradients of all replicas (`all_gather` along the batch
axis) and reduces the global tensors: every replica then holds the same
values, which Keras's reduction of the step's logs (a mean over replicas)
returns unchanged. Weight gradients are summed over the replicas, as the
optimizer does. All are collectives of the replica context, called in the
same order on every replica (the backward passes and the optimizer calls
are the same program), only in monitored steps.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def _context() -> Any:
    """The replica context of a step run by `strategy.run` on several replicas."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


class TensorFlowReplicas:
    @staticmethod
    def gather(activation: Any, gradient: Any) -> tuple[Any, Any]:
        """The activation and gradient of the global batch (all replicas')."""
        context = _context()
        if context is None or activation.shape.rank == 0:
            return activation, gradient
        activation, gradient = context.all_gather([activation, gradient], axis=0)
        return activation, gradient

    @staticmethod
    def sum(gradients: list[Any]) -> list[Any]:
        """The weight gradients summed over the replicas (None stays None)."""
        context = _context()
        present = [g for g in gradients if g is not None]
        if context is None or not present:
            return gradients
        reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
        return [None if g is None else next(reduced) for g in gradients]

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Strategies other than `MirroredStrategy` with several replicas.

        `MultiWorkerMirroredStrategy` (several processes; Keras 3's `fit`
        does not run under it), `TPUStrategy`, `ParameterServerStrategy`:
        not combined, hence refused.
        """
        strategy = getattr(model, "distribute_strategy", None)
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        if replicas == 1 or isinstance(strategy, tf.distribute.MirroredStrategy):
            return None
        return f"{type(strategy).__name__} with {replicas} replicas"
