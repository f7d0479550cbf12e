"""Distributed PyTorch: refused by the monitored step.

Keras's PyTorch backend implements no `keras.distribution`, and its `fit`
runs one process on its own batches: with `torch.distributed` initialised
over several processes, each would report its own share of the batch.
"""

from __future__ import annotations

import keras
import torch.distributed as dist

from keras_actgrad._backends.base import OneProgram


class TorchReplicas(OneProgram):
    @staticmethod
    def unsupported(model: keras.Model) -> str | None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        size = int(dist.get_world_size())
        return f"torch.distributed with {size} processes" if size > 1 else None
