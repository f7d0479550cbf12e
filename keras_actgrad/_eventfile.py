"""Reading event files without TensorFlow: records, then `Event` protos.

An event file is a TFRecord file: each record is a little-endian uint64
length, a uint32 masked CRC-32C of the length, the data, and a uint32
masked CRC-32C of the data. The data is a serialized `Event` proto, parsed
here with TensorBoard's compiled protos (`tensorboard.compat.proto`), which
import neither TensorFlow nor Keras, so that the report starts in well under
a second. A record cut short (a file still being written) ends the file;
the checksums are not verified (TensorBoard's own readers do the same by
default).

`read_file` returns what the report and the monitor's `to_numpy` read:
every scalar (the stock summaries: TensorFlow 2 scalar tensors and TF1
`simple_value`s), the last value of the JSON text summaries, and the packed
rows of the monitor's step events (`_tags.STEP_VALUES_TAG`, laid out by the
column names of `_tags.STEP_COLUMNS_TAG`, see `_tensorboard.py`). In a step
event that carries packed rows the stock scalars repeat packed columns and
are skipped, which keeps reading a long run fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from keras_actgrad._tags import STEP_COLUMNS_TAG, STEP_VALUES_TAG

_HEADER = struct.Struct("<QI")
_FLOAT = 1  # types_pb2.DT_FLOAT
_DOUBLE = 2  # types_pb2.DT_DOUBLE


def records(path: str) -> Iterator[bytes]:
    """The records of a TFRecord file, in order (an incomplete last one ends it)."""
    if "://" in path:  # remote file systems through TensorBoard's gfile
        from tensorboard.compat import tf

        opened: Any = tf.io.gfile.GFile(path, "rb")
    else:
        opened = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed below
    with opened as file:
        read = file.read
        while True:
            header = read(12)
            if len(header) < 12:
                return
            (length, _) = _HEADER.unpack(header)
            data = read(length)
            if len(data) < length or len(read(4)) < 4:
                return
            yield data


@dataclasses.dataclass
class EventFile:
    """What one event file holds (see the module docstring).

    Attributes:
        scalars: `{tag: {step: value}}` of the stock scalars (the last
            value written at a step wins).
        texts: `{tag: parsed JSON}` of the text summaries, the last one.
        steps: the packed step events' global steps, in file order.
        rows: their packed values, one 1-D float64 array per step event.
        columns: the column names of each row (a shared list while the
            columns do not change).
    """

    scalars: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    texts: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: list[int] = dataclasses.field(default_factory=list)
    rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    columns: list[list[str]] = dataclasses.field(default_factory=list)


def _scalar_value(value: Any) -> float | None:
    """A stock scalar's value, or None for any other summary value."""
    which = value.WhichOneof("value")
    if which == "simple_value":
        return float(value.simple_value)
    if which != "tensor":
        return None
    tensor = value.tensor
    if tensor.tensor_shape.dim:
        return None
    if tensor.dtype == _FLOAT and len(tensor.float_val) == 1:
        return float(tensor.float_val[0])
    if tensor.dtype == _DOUBLE and len(tensor.double_val) == 1:
        return float(tensor.double_val[0])
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(tensor)
    if array.dtype.kind not in "fiub" or array.size != 1:
        return None
    return float(array.item())


def _text(value: Any) -> Any:
    tensor = value.tensor
    if not tensor.string_val:
        return None
    try:
        return json.loads(tensor.string_val[0].decode("utf-8"))
    except ValueError:
        return None


def read_file(path: str, keep: Callable[[str], bool] | None = None) -> EventFile:
    """Reads one event file (see `EventFile`); of the packed rows, only the
    columns whose name `keep` accepts (all without `keep`)."""
    from tensorboard.compat.proto import event_pb2

    out = EventFile()
    plugins: dict[str, str] = {}  # metadata comes with a tag's first value only
    columns: list[str] = []
    chosen: np.ndarray | None = None
    parse = event_pb2.Event.FromString
    for record in records(path):
        event = parse(record)
        if not event.HasField("summary"):
            continue
        values = event.summary.value
        step = int(event.step)
        packed = bool(values) and values[0].tag == STEP_VALUES_TAG
        if packed:
            row = np.frombuffer(values[0].tensor.tensor_content, "<f8")
            if len(values) > 1 and values[1].tag == STEP_COLUMNS_TAG:
                columns = list(_text(values[1]) or [])
                chosen = None
                if keep is not None:
                    chosen = np.asarray(
                        [i for i, name in enumerate(columns) if keep(name)], np.intp
                    )
                    columns = [columns[i] for i in chosen]
            out.steps.append(step)
            out.rows.append(row if chosen is None else row[chosen[chosen < row.size]])
            out.columns.append(columns)
            if len(values) < 2 or values[1].tag != STEP_COLUMNS_TAG:
                # Texts change only with the columns (see `_tensorboard.py`).
                continue
        for value in values:
            tag = value.tag
            if packed and tag.startswith("actgrad_step."):
                continue  # repeats a packed column
            plugin = value.metadata.plugin_data.plugin_name
            if plugin:
                plugins[tag] = plugin
            else:
                plugin = plugins.get(tag, "")
            if plugin == "text":
                out.texts[tag] = _text(value)
            elif plugin in ("scalars", "") and not packed:
                number = _scalar_value(value)
                if number is not None:
                    out.scalars.setdefault(tag, {})[step] = number
    return out


def event_files(directory: str) -> list[str]:
    """The event files in `directory`, oldest first (their names start with
    the creation time, as TensorBoard's writers and ours name them)."""
    return sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if "tfevents" in name and os.path.isfile(os.path.join(directory, name))
    )


def table(
    files: list[EventFile],
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(steps, {column: values}, {column: present})` of the packed rows of
    `files`, in order.

    A column missing from some rows (a spike step's extra statistics) is NaN
    there, and `present` holds its mask (columns in every row have none).
    Columns keep the order they first appear in.
    """
    steps: list[int] = []
    names: dict[str, None] = {}
    groups: list[tuple[list[str], list[np.ndarray]]] = []
    for file in files:
        steps += file.steps
        for row, columns in zip(file.rows, file.columns, strict=True):
            if not groups or groups[-1][0] is not columns:
                groups.append((columns, []))
                names.update(dict.fromkeys(columns))
            groups[-1][1].append(row)
    index = {name: i for i, name in enumerate(names)}
    out = np.full((len(names), len(steps)), np.nan)  # a column per row
    present = np.zeros((len(names), len(steps)), bool)
    start = 0
    for columns, rows in groups:
        block = np.stack(rows) if rows else np.zeros((0, len(columns)))
        width = min(block.shape[1], len(columns))
        where = [index[name] for name in columns[:width]]
        out[where, start : start + len(rows)] = block[:, :width].T
        present[where, start : start + len(rows)] = True
        start += len(rows)
    masks = {name: present[i] for name, i in index.items() if not present[i].all()}
    return (
        np.asarray(steps, np.int64),
        {name: out[i] for name, i in index.items()},
        masks,
    )
