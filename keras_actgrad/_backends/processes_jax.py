"""Several JAX processes (multi-host): the probe batch, the outputs, the writer.

Under `jax.distributed` (`keras.distribution.initialize`) every process
runs the same program, and a `keras.distribution` whose device mesh spans
the processes makes one global computation of it: its reductions are over
the global arrays, so the statistics are the global batch's, and every
process holds them. What is left to do here:

- the probe batch: each process may pass its own share of the global
  batch, or the same whole batch; the processes compare what they hold
  (one small all-gather of its structure and a digest) and assemble the
  global batch on every host (`global_batch`), then place it on the mesh
  without JAX's per-call equality check (`place`);
- the outputs of a pass, and the monitored step's vector, are replicated
  on every device (`replicated`), so that each host reads them without a
  collective;
- one writer: process 0 (`index`).

Every function that communicates is called by every process at the same
point of the same program: none runs under a condition on the process
index, so no process waits in a collective that another one skips.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import keras
import numpy as np


def count() -> int:
    return int(jax.process_count())


def index() -> int:
    return int(jax.process_index())


def _mesh_processes(distribution: Any) -> set[int]:
    """The processes whose devices are in the distribution's device mesh."""
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None:
        return set()
    devices = np.asarray(mesh.backend_mesh.devices).ravel()
    return {int(device.process_index) for device in devices}


def spanning() -> bool:
    """Whether several processes run one `keras.distribution` over all of them."""
    if count() < 2:
        return False
    distribution = keras.distribution.distribution()
    return distribution is not None and _mesh_processes(distribution) == set(
        range(count())
    )


def unsupported() -> str | None:
    """Several processes without a distribution over all of them, described."""
    if count() < 2 or spanning():
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return f"{count()} JAX processes and no `keras.distribution`"
    held = sorted(_mesh_processes(distribution))
    return (
        f"{count()} JAX processes and a {type(distribution).__name__} whose "
        f"device mesh has devices of processes {held} only"
    )


# The probe batch.


def _digest(text: bytes) -> tuple[int, int]:
    value = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
    return value & 0xFFFFFFFF, value >> 32


def _signature(data: Any) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(examples, digest of the structure, digest of the values) of a batch."""
    leaves = keras.tree.flatten(data)
    structure = [repr(keras.tree.map_structure(lambda _: 0, data))]
    values = hashlib.blake2b(digest_size=8)
    rows = 0
    for leaf in leaves:
        array = np.asarray(leaf)
        structure.append(f"{array.dtype.str}{array.shape[1:]}")
        if array.ndim:
            rows = max(rows, int(array.shape[0]))
        if array.dtype.kind == "O":
            values.update(repr(array.tolist()).encode())
        else:
            values.update(np.ascontiguousarray(array).tobytes())
    whole = _digest(values.digest())
    return rows, _digest("|".join(structure).encode()), whole


def _gather(vector: np.ndarray) -> np.ndarray:
    """Every process's `vector` (uint32), in process order, on every process."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(vector)
    return np.asarray(gathered, np.uint32).reshape(count(), -1)


def global_batch(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
    """The global probe batch (NumPy), the same on every process.

    Each process passes its share of the batch, or the same whole batch on
    each: the processes exchange the batch's structure (shapes beyond the
    batch dimension, dtypes), its number of examples and a digest of its
    values. The same values everywhere: that is the batch. Otherwise the
    shares are assembled as Keras assembles a training batch
    (`jax.make_array_from_process_local_data` with the distribution's data
    layout: under a mesh of `jax.devices()`, process 0's share first), and
    the global batch is gathered on every host.
    """
    from keras_actgrad._engine.inputs import describe

    data = (x, y, sample_weight)
    rows, structure, values = _signature(data)
    mine = np.asarray([rows, *structure, *values], np.uint32)
    table = _gather(mine)
    here = f"x={describe(x)}, y={describe(y)}, sample_weight={describe(sample_weight)}"
    if len({tuple(row[1:3]) for row in table}) > 1:
        raise ValueError(
            "The probe batch differs between the JAX processes in its arrays' "
            "structure, dtypes or shapes (beyond the batch dimension). Pass "
            "on every process either its own share of the global probe batch "
            "(the same arrays, each process with its own examples) or the "
            f"same whole batch. Received: on process {index()} of {count()}: "
            f"{here}."
        )
    if len({tuple(row) for row in table}) == 1:
        return x, y, sample_weight  # the same whole batch on every process
    counts = [int(row[0]) for row in table]
    if len(set(counts)) > 1:
        raise ValueError(
            "The probe batch differs between the JAX processes, so it is "
            "taken as each process's share of the global probe batch; but "
            "the shares hold different numbers of examples. Pass on every "
            "process an equal share (the global batch split as Keras splits "
            "the training batch: in process order under a mesh of "
            "`jax.devices()`) or the same whole batch. Received: examples per "
            f"process {counts}; on process {index()}: {here}."
        )
    distribution = keras.distribution.distribution()
    digests = [tuple(row[3:]) for row in table]

    def assemble(leaf: Any) -> Any:
        array = np.asarray(leaf)
        if array.dtype.kind not in "biuf" or not array.ndim:
            return leaf
        # The dtype `keras.ops.convert_to_tensor` gives (as on one process).
        array = np.asarray(keras.ops.convert_to_tensor(array))
        sharding = distribution.get_data_layout(tuple(array.shape)).backend_layout
        try:
            whole = jax.make_array_from_process_local_data(sharding, array)
        except ValueError as error:
            raise ValueError(
                "The processes' shares of the probe batch cannot be laid out "
                f"as the distribution lays out a batch: {error} Pass shares "
                "that split evenly over each process's devices (as the "
                "training batches do), or the same whole batch on every "
                f"process. Received: on process {index()}: {here}."
            ) from error
        _check_replicas(sharding, tuple(whole.shape), digests, here)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(whole, tiled=True))

    return tuple(  # type: ignore[return-value]
        None if part is None else keras.tree.map_structure(assemble, part)
        for part in data
    )


def _check_replicas(
    sharding: Any, shape: tuple[int, ...], digests: list[Any], here: str
) -> None:
    """Processes that hold the same examples under the mesh passed the same."""
    held: dict[int, set[tuple[int, int]]] = {}
    for device, where in sharding.devices_indices_map(shape).items():
        rows = where[0] if where else slice(None)
        start, stop, _ = rows.indices(shape[0])
        held.setdefault(int(device.process_index), set()).add((start, stop))
    groups: dict[frozenset[tuple[int, int]], list[int]] = {}
    for process, rows_held in sorted(held.items()):
        groups.setdefault(frozenset(rows_held), []).append(process)
    for processes in groups.values():
        if len({digests[p] for p in processes}) > 1:
            raise ValueError(
                f"Under this device mesh, JAX processes {processes} hold the "
                "same examples of the batch (they are replicas along the "
                "batch axis), but they passed different probe batches. Pass "
                "the same share on processes that hold the same part of the "
                "batch, as for the training data, or the same whole batch "
                f"on every process. Received: on process {index()}: {here}."
            )


def place(leaf: np.ndarray) -> Any:
    """A NumPy leaf of the global batch (the same on every process), on the mesh.

    Laid out as the distribution lays out data (split along the batch), or
    replicated where the batch does not divide over the mesh: the array is
    made from each host's copy, without `jax.device_put`'s check that every
    process passed the same value (a collective, at every call).
    """
    distribution = keras.distribution.distribution()
    sharding: Any = None
    if leaf.ndim:
        layout = distribution.get_data_layout(tuple(leaf.shape))
        sharding = layout.backend_layout
        try:
            sharding.shard_shape(tuple(leaf.shape))
        except ValueError:
            sharding = None
    if sharding is None:
        mesh = distribution.device_mesh.backend_mesh
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # The dtype `keras.ops.convert_to_tensor` gives (as on one process).
    value = np.asarray(keras.ops.convert_to_tensor(leaf))
    return jax.make_array_from_process_local_data(sharding, value, value.shape)


def replicated(tree: Any) -> Any:
    """Inside a trace: every array of `tree` replicated on every device."""
    if not spanning():
        return tree
    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def constrain(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) or hasattr(leaf, "aval"):
            return jax.lax.with_sharding_constraint(leaf, sharding)
        return leaf

    return jax.tree_util.tree_map(constrain, tree)


class JaxProcesses:
    """`base.Processes` for JAX."""

    @staticmethod
    def count() -> int:
        return count()

    @staticmethod
    def index() -> int:
        return index()

    @staticmethod
    def spanning() -> bool:
        return spanning()

    @staticmethod
    def unsupported() -> str | None:
        return unsupported()

    @staticmethod
    def global_batch(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        return global_batch(x, y, sample_weight)

    @staticmethod
    def place(leaf: Any) -> Any:
        return place(leaf)

    @staticmethod
    def replicated(tree: Any) -> Any:
        return replicated(tree)
