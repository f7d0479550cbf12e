"""The only module that writes TensorBoard summaries.

`EventWriter` writes one event file in `<log_dir>/actgrad/`, beside the
`train/` and `validation/` directories of Keras's `TensorBoard` callback,
with explicit steps. It builds the summaries itself (TensorBoard's protos
and plugin metadata) and writes them as TFRecords: with TensorFlow's
`TFRecordWriter` when TensorFlow is installed, else with TensorBoard's
pure-Python record writer. So it needs the `tensorboard` package, no
TensorFlow session, and works with every Keras backend; both are imported
lazily, when a writer is created.

What it writes, per probe event (the contract `_report.py` reads; every
tag is built in `_tags.py`):

- scalars `<prefix>.<statistic>/<probe>`, stored as TensorFlow 2 writes
  them (`tf.summary.scalar`): a float32 scalar tensor with the `scalars`
  plugin metadata. Read them with `EventAccumulator(...).Tensors(tag)`.
- histograms `<prefix>.gradient/<probe>` and `<prefix>.activation/<probe>`:
  a float64 `[k, 3]` tensor of (left edge, right edge, count) with the
  `histograms` plugin metadata, as `tf.summary.histogram` writes it.
- scalars `<weights prefix>.grad_norm/<variable path>`.
- the monitor's step events (`packed`): first in the event, every value of
  the step in one float64 tensor `actgrad_step/values` (plugin `actgrad`),
  then, whenever they change, the JSON list of its column names (the
  `to_numpy` keys) as a string tensor `actgrad_step/columns`; the event's
  scalars repeat the headline columns (`_eventfile.py` reads it).
- text `actgrad/probe_order` (epoch events, and any event whose probe order
  differs from the last one written): a JSON list of probe names in
  forward order; text `actgrad/alert_thresholds` (epoch events, and the
  first event of the file).

A tag's metadata is written with its first value in the file only, as
TensorFlow's writers do (TensorBoard keeps the first one).
- a Custom Scalars layout (`_layout.py`: every probe of a statistic on one
  chart) with the first event of each kind, and again whenever the probes
  or the kinds change (TensorBoard shows the last one).
- image `actgrad/grad_norm_profile` (epoch events, only with
  `profile_images=True`): every probe's `grad_norm` as a bar chart on a log
  scale, stored as `tf.summary.image` stores it (a string tensor
  `[width, height, png]` with the `images` plugin metadata).

`<prefix>` is `actgrad` (epoch events, step = epoch index), `actgrad_start`
(`probe_at_start`, step = global step before the first update) or
`actgrad_batch` (`batch_freq`, step = global training step); the weight
prefixes are `actgrad_weights`, `actgrad_weights_start` and
`actgrad_weights_batch` (see `_tags.py`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keras_actgrad._layout import layout
from keras_actgrad._statistics.statistics import Reduced
from keras_actgrad._tags import (
    EVENTS_SUBDIR,
    PROBE_ORDER_TAG,
    PROFILE_IMAGE_TAG,
    STEP_COLUMNS_TAG,
    STEP_VALUES_TAG,
    THRESHOLDS_TAG,
    summary_tag,
    weight_summary_tag,
)

_file_counter = 0


def histogram_buckets(low: float, high: float, counts: np.ndarray) -> np.ndarray:
    """The `[k, 3]` (left, right, count) layout of TensorBoard's histograms.

    Mirrors `tensorboard.plugins.histogram.summary_v2`: equal-width buckets
    over `[low, high]`; when all values are equal every edge is that value
    and the last bucket holds the count; without data, all zeros.
    """
    k = len(counts)
    counts = np.asarray(counts, dtype=np.float64)
    if k == 0 or counts.sum() == 0 or not np.isfinite(low):
        return np.zeros((k, 3), dtype=np.float64)
    if low == high:
        edges = np.full(k, low, dtype=np.float64)
        last = np.zeros(k, dtype=np.float64)
        last[-1] = counts.sum()
        return np.stack([edges, edges, last], axis=1)
    edges = np.linspace(low, high, k + 1)
    return np.stack([edges[:-1], edges[1:], counts], axis=1)


def _scalar(value: float) -> Any:
    """A float32 scalar `TensorProto` (what `tf.summary.scalar` writes)."""
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        float_val=[float(value)],
    )


def _float64_matrix(array: np.ndarray) -> Any:
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        tensor_content=np.ascontiguousarray(array, dtype="<f8").tobytes(),
    )


def _string(text: str | bytes) -> Any:
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[text.encode("utf-8") if isinstance(text, str) else text],
    )


def _image_tensor(image: np.ndarray) -> Any:
    from tensorboard.util import tensor_util

    return tensor_util.make_tensor_proto(image)


class EventWriter:
    """Writes probe events to `<log_dir>/actgrad/events.out.tfevents.*`.

    Creating the writer creates the directory and the file and raises
    `OSError` if it cannot. Afterwards a failed write (directory removed,
    disk full) warns once and turns the writer off; training is unaffected.
    """

    def __init__(
        self,
        log_dir: str,
        profile_images: bool = False,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        global _file_counter
        try:
            from tensorboard.compat.proto import event_pb2
        except ImportError as error:
            raise ImportError(
                "Writing TensorBoard logs (`log_dir`) needs the `tensorboard` "
                "package, which is not installed (it comes with TensorFlow, but "
                "the JAX and PyTorch backends do not need TensorFlow). Install it "
                'with `pip install "keras-actgrad[report]"` (or '
                "`pip install tensorboard`), or pass `log_dir=None`. "
                f"Received: log_dir={log_dir!r}."
            ) from error

        self.directory = os.path.join(str(log_dir), EVENTS_SUBDIR)
        self._remote = "://" in self.directory
        self._makedirs(self.directory)
        _file_counter += 1
        self.path = os.path.join(
            self.directory,
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{_file_counter}.actgrad",
        )
        self._file = self._open(self.path)
        self.active = True
        self._metadata: dict[str, Any] = {}
        self.profile_images = profile_images
        self.thresholds = dict(thresholds or {})
        self._order_written: list[str] | None = None
        self._layout_written: tuple[Any, ...] | None = None
        self._kinds: list[str] = []
        # Tags written so far: a tag's metadata goes with its first value
        # only, as TensorFlow's writers do (readers keep the first one).
        self._tagged: set[str] = set()
        self._columns_written: list[str] | None = None
        self._write_record(
            event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        )
        self._file.flush()

    # File system (local files with `open`, remote ones with gfile).

    def _makedirs(self, directory: str) -> None:
        if self._remote:
            from tensorboard.compat import tf

            tf.io.gfile.makedirs(directory)
        else:
            os.makedirs(directory, exist_ok=True)

    def _open(self, path: str) -> Any:
        """A record writer: `write(bytes)`, `flush()`, `close()`.

        An event file is a TFRecord file of `Event` protos. TensorFlow's
        `TFRecordWriter` (C++ checksums, any TensorFlow file system) is used
        when TensorFlow is installed; otherwise TensorBoard's pure-Python
        record writer on a local file.
        """
        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow as tf

            try:
                return tf.io.TFRecordWriter(path)
            except tf.errors.OpError as error:
                raise OSError(f"cannot create {path}: {error.message}") from error
        from tensorboard.summary.writer.record_writer import RecordWriter

        class _Records:
            def __init__(self, file: Any) -> None:
                self._file = file
                self._writer = RecordWriter(file)

            def write(self, data: bytes) -> None:
                self._writer.write(data)

            def flush(self) -> None:
                self._file.flush()

            def close(self) -> None:
                self._file.close()

        if self._remote:
            from tensorboard.compat import tf as tf_compat

            return _Records(tf_compat.io.gfile.GFile(path, "wb"))
        return _Records(open(path, "wb"))  # noqa: SIM115 - closed in `close`

    def _exists(self) -> bool:
        if self._remote:
            from tensorboard.compat import tf

            return bool(tf.io.gfile.exists(self.path))
        return os.path.exists(self.path)

    def _write_record(self, event: Any) -> None:
        self._file.write(event.SerializeToString())

    # Summary values.

    def _plugin_metadata(self, plugin: str) -> Any:
        if plugin not in self._metadata:
            if plugin == "scalars":
                from tensorboard.plugins.scalar import metadata
            elif plugin == "custom_scalars":
                from tensorboard.plugins.custom_scalar import metadata

                self._metadata[plugin] = metadata.create_summary_metadata()
                return self._metadata[plugin]
            elif plugin == "histograms":
                from tensorboard.plugins.histogram import metadata
            elif plugin == "images":
                from tensorboard.plugins.image import metadata
            else:
                from tensorboard.plugins.text import metadata
            self._metadata[plugin] = metadata.create_summary_metadata(
                display_name=None, description=None
            )
        return self._metadata[plugin]

    def _add(self, summary: Any, tag: str, metadata: Any, tensor: Any) -> None:
        """Adds a value; the metadata only with the tag's first value."""
        if tag in self._tagged:
            summary.value.add(tag=tag, tensor=tensor)
        else:
            self._tagged.add(tag)
            summary.value.add(tag=tag, metadata=metadata, tensor=tensor)

    def _add_packed(self, summary: Any, columns: Sequence[str], row: Any) -> None:
        """The packed values of a step event, first in its summary, and their
        column names when they changed (`_eventfile.read_file` reads them)."""
        from tensorboard.compat.proto import summary_pb2

        if "actgrad" not in self._metadata:
            self._metadata["actgrad"] = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(
                    plugin_name="actgrad"
                ),
                data_class=summary_pb2.DATA_CLASS_TENSOR,
            )
        metadata = self._metadata["actgrad"]
        row = np.asarray(row, dtype="<f8")
        self._add(summary, STEP_VALUES_TAG, metadata, _float64_matrix(row))
        if self._columns_written != list(columns):
            self._columns_written = list(columns)
            self._add(
                summary,
                STEP_COLUMNS_TAG,
                metadata,
                _string(json.dumps(self._columns_written)),
            )

    def write(
        self,
        kind: str,
        step: int,
        reduced: Reduced,
        statistics: Sequence[str],
        probe_order: Sequence[str],
        scalars: Mapping[str, float] | None = None,
        packed: tuple[Sequence[str], Any] | None = None,
    ) -> bool:
        """Writes one probe event; returns False if writing failed or is off.

        `scalars` are more scalars of the event, by tag. `packed`, `(column
        names, values)`, are the event's values packed in one tensor (the
        monitor's step events; the event's scalars then repeat some of them
        for TensorBoard's own dashboards).
        """
        if not self.active:
            return False
        try:
            self._write(kind, step, reduced, statistics, probe_order, scalars, packed)
        except Exception as error:  # noqa: BLE001 - a failed write must not stop training
            self._fail(error)
            return False
        return True

    def _write(
        self,
        kind: str,
        step: int,
        reduced: Reduced,
        statistics: Sequence[str],
        probe_order: Sequence[str],
        scalars: Mapping[str, float] | None = None,
        packed: tuple[Sequence[str], Any] | None = None,
    ) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if not self._exists():
            raise FileNotFoundError(
                f"the event file {self.path} no longer exists (was the log "
                "directory removed?)"
            )
        summary = summary_pb2.Summary()
        if packed is not None:
            self._add_packed(summary, *packed)
        scalar = self._plugin_metadata("scalars")
        histogram = self._plugin_metadata("histograms")
        for probe in probe_order:
            values = reduced.statistics.get(probe, {})
            for statistic in statistics:
                self._add(
                    summary,
                    summary_tag(kind, probe, statistic),
                    scalar,
                    _scalar(values.get(statistic, np.nan)),
                )
            for name, (low, high, counts) in reduced.histograms.get(probe, {}).items():
                self._add(
                    summary,
                    summary_tag(kind, probe, name),
                    histogram,
                    _float64_matrix(histogram_buckets(low, high, counts)),
                )
        for path, norm in reduced.weight_grad_norms.items():
            self._add(summary, weight_summary_tag(kind, path), scalar, _scalar(norm))
        for tag, value in (scalars or {}).items():
            self._add(summary, tag, scalar, _scalar(value))
        if kind == "epoch" or self._order_written != list(probe_order):
            self._add(
                summary,
                PROBE_ORDER_TAG,
                self._plugin_metadata("text"),
                _string(json.dumps(list(probe_order))),
            )
            self._order_written = list(probe_order)
        self._add_layout(summary, kind, statistics, probe_order)
        if self.thresholds and (kind == "epoch" or THRESHOLDS_TAG not in self._tagged):
            self._add(
                summary,
                THRESHOLDS_TAG,
                self._plugin_metadata("text"),
                _string(json.dumps(self.thresholds, sort_keys=True)),
            )
        if kind == "epoch":
            image = self._profile_image(step, reduced, probe_order)
            if image is not None:
                self._add(
                    summary,
                    PROFILE_IMAGE_TAG,
                    self._plugin_metadata("images"),
                    _image_tensor(image),
                )
        self._write_record(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        )
        self._file.flush()

    def _add_layout(
        self,
        summary: Any,
        kind: str,
        statistics: Sequence[str],
        probe_order: Sequence[str],
    ) -> None:
        """Adds the Custom Scalars layout when the probes or kinds changed."""
        from tensorboard.plugins.custom_scalar import metadata

        if kind not in self._kinds:
            self._kinds.append(kind)
        key = (tuple(self._kinds), tuple(statistics), tuple(probe_order))
        if key == self._layout_written:
            return
        self._add(
            summary,
            metadata.CONFIG_SUMMARY_TAG,
            self._plugin_metadata("custom_scalars"),
            _string(layout(probe_order, statistics, self._kinds).SerializeToString()),
        )
        self._layout_written = key

    def _profile_image(
        self, step: int, reduced: Reduced, probe_order: Sequence[str]
    ) -> np.ndarray | None:
        """`[width, height, png]` of the grad_norm bar chart, or None.

        A failed drawing warns once and turns the images off; the scalars
        and histograms are still written.
        """
        if not self.profile_images:
            return None
        try:
            from keras_actgrad._plots import profile_png

            norms = [
                reduced.statistics.get(probe, {}).get("grad_norm", np.nan)
                for probe in probe_order
            ]
            png, width, height = profile_png(
                probe_order,
                norms,
                f"grad_norm by probe, epoch {step}",
                self.thresholds.get("vanishing"),
            )
        except Exception as error:  # noqa: BLE001 - the scalars still go out
            self.profile_images = False
            warnings.warn(
                "ActivationGradientCallback could not draw the grad_norm profile "
                "image (`profile_images=True`) and stops drawing it for this run; "
                f"scalars and histograms are still written. Cause: {error!r}",
                stacklevel=4,
            )
            return None
        return np.array([str(width).encode(), str(height).encode(), png], dtype=object)

    def _fail(self, error: BaseException) -> None:
        self.active = False
        warnings.warn(
            f"ActivationGradientCallback could not write TensorBoard summaries to "
            f"'{self.directory}' and stops writing them for this run; training "
            f"and the `logs` keys are not affected. Cause: {error!r}",
            stacklevel=3,
        )
        self._close_file()

    def _close_file(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001, S110 - nothing more to do
            pass

    def close(self) -> None:
        """Flushes and closes the event file."""
        if not self.active:
            return
        try:
            self._file.flush()
        except Exception as error:  # noqa: BLE001
            self._fail(error)
            return
        self.active = False
        self._close_file()
