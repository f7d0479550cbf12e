"""The `actgrad` TensorBoard plugin: a probe x step heatmap of any statistic.

TensorBoard finds it through the package's entry point (group
`tensorboard_plugins`) and shows it as the "actgrad" tab whenever a run holds
keras-actgrad scalars. The page (`static/index.js`, plain JavaScript, no
build step) runs in TensorBoard's plugin iframe and reads JSON from the
plugin's own routes, under `/data/plugin/actgrad/`:

- `runs`: the runs with keras-actgrad scalars, and per run the kinds of
  events (`epoch`, `start`, `batch`, `step`) and their statistics.
- `heatmap?run=R&kind=K&statistic=S`: the probes (forward order), the
  steps, the values (one row per probe; `null` where a probe was not logged
  at a step; non-finite values as the strings "NaN", "Infinity",
  "-Infinity"), the alert thresholds and the alerts per cell.

A `GradientMonitor` run also lists, under the `step` kind, the statistics
`weights: grad_norm`, `weights: update_norm` and `weights: update_ratio`:
one row per trainable variable, read from the packed step values
(`actgrad_step/values`, see `_tensorboard.py`), sampled as TensorBoard
samples tensors of the `actgrad` plugin (1000 per run unless
`--samples_per_plugin actgrad=N` says otherwise, see
`tensorboard_plugin_actgrad.py`).

The data is read through TensorBoard's data provider (the same reservoirs
the Scalars dashboard reads: by default at most 1000 points per tag, see
`tensorboard --samples_per_plugin scalars=N`), so the page follows training
as TensorBoard reloads the event files.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
import posixpath
import re
from collections.abc import Callable
from typing import Any

from tensorboard import context as tb_context
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from keras_actgrad import _alerts, _tags

PLUGIN_NAME = "actgrad"
_STATIC = os.path.join(os.path.dirname(__file__), "static")
_SCALARS = "scalars"
_TEXT = "text"
# The monitor's packed step values, the weight statistics read from them.
_WEIGHTS = "weights: "
_MAX_DOWNSAMPLE = 100_000


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ActgradPlugin(base_plugin.TBPlugin):
    """TensorBoard plugin serving the probe x step heatmap page and its data."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider

    # TBPlugin interface.

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        return {
            "/runs": _wsgi(self._serve_runs),
            "/heatmap": _wsgi(self._serve_heatmap),
            "/static/*": _wsgi(self._serve_static),
        }

    def is_active(self) -> bool:
        if self._data_provider is None:
            return False
        runs = self._data_provider.list_scalars(
            tb_context.RequestContext(), experiment_id="", plugin_name=_SCALARS
        )
        return any(
            _tags.parse_summary_tag(tag) is not None
            for tags in runs.values()
            for tag in tags
        )

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(
            es_module_path="/static/index.js", tab_name="actgrad"
        )

    # Data.

    def runs(self, ctx: Any, experiment: str) -> list[dict[str, Any]]:
        """`[{"run": name, "kinds": {kind: [statistic, ...]}}]`, runs sorted."""
        listing = self._data_provider.list_scalars(
            ctx, experiment_id=experiment, plugin_name=_SCALARS
        )
        packed = self._data_provider.list_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME
        )
        out = []
        for run in sorted(listing):
            kinds: dict[str, set[str]] = {}
            for tag in listing[run]:
                parsed = _tags.parse_summary_tag(tag)
                if parsed is not None and parsed.target == "probe":
                    kinds.setdefault(parsed.kind, set()).add(parsed.name)
            if _tags.STEP_VALUES_TAG in packed.get(run, {}):
                kinds.setdefault("step", set()).update(
                    _WEIGHTS + name for name in _tags.WEIGHT_STATISTICS
                )
            if kinds:
                ordered = {
                    kind: sorted(kinds[kind])
                    for kind in _tags.PREFIXES
                    if kind in kinds
                }
                out.append({"run": run, "kinds": ordered})
        return out

    def heatmap(
        self,
        ctx: Any,
        experiment: str,
        run: str,
        kind: str,
        statistic: str,
        downsample: int = 1000,
    ) -> dict[str, Any]:
        """The probe x step matrix of one statistic of one run and kind."""
        if kind == "step" and statistic.startswith(_WEIGHTS):
            return self._weights(ctx, experiment, run, statistic, downsample)
        listing = self._data_provider.list_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=_SCALARS,
            run_tag_filter=provider.RunTagFilter(runs=[run]),
        )
        wanted = {statistic, "grad_norm", "nonfinite"}
        tags = {}
        for tag in listing.get(run, {}):
            parsed = _tags.parse_summary_tag(tag)
            if (
                parsed is not None
                and parsed.target == "probe"
                and parsed.kind == kind
                and parsed.name in wanted
            ):
                tags[tag] = parsed
        if not any(parsed.name == statistic for parsed in tags.values()):
            raise errors.NotFoundError(
                f"run {run!r} has no {kind} events of statistic {statistic!r}"
            )
        data = self._data_provider.read_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=_SCALARS,
            downsample=downsample,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(tags)),
        ).get(run, {})
        series: dict[str, dict[str, dict[int, float]]] = {}
        for tag, points in data.items():
            parsed = tags[tag]
            per_probe = series.setdefault(parsed.name, {})
            per_probe[parsed.key] = {int(p.step): float(p.value) for p in points}
        shown = series.get(statistic, {})
        probes = self._probe_order(ctx, experiment, run, shown)
        steps = sorted({step for values in shown.values() for step in values})
        values = [[shown[probe].get(step) for step in steps] for probe in probes]
        thresholds = self._thresholds(ctx, experiment, run)
        alerts = _cell_alerts(
            probes,
            steps,
            series.get("grad_norm", {}),
            series.get("nonfinite", {}),
            shown,
            thresholds,
        )
        return {
            "run": run,
            "kind": kind,
            "statistic": statistic,
            "probes": probes,
            "steps": steps,
            "values": values,
            "thresholds": thresholds,
            "alerts": alerts,
        }

    def _weights(
        self, ctx: Any, experiment: str, run: str, statistic: str, downsample: int
    ) -> dict[str, Any]:
        """The variable x step matrix of a weight statistic, from the packed
        step values (the weights' columns end every row, in the same order,
        whatever the probes' columns)."""
        name = statistic[len(_WEIGHTS) :]
        data = self._data_provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=PLUGIN_NAME,
            downsample=downsample,
            run_tag_filter=provider.RunTagFilter(
                runs=[run], tags=[_tags.STEP_VALUES_TAG, _tags.STEP_COLUMNS_TAG]
            ),
        ).get(run, {})
        columns: list[str] = []
        for point in data.get(_tags.STEP_COLUMNS_TAG, [])[-1:]:
            raw = point.numpy.item()
            columns = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        weights = [
            (i - len(columns), parsed[1])
            for i, parsed in enumerate(map(_tags.parse_key, columns))
            if parsed is not None
            and parsed[0] == _tags.WEIGHTS_LOG_PREFIX
            and parsed[2] == name
        ]
        if name not in _tags.WEIGHT_STATISTICS or not weights:
            raise errors.NotFoundError(
                f"run {run!r} has no step events of statistic {statistic!r}"
            )
        points = sorted(data.get(_tags.STEP_VALUES_TAG, []), key=lambda p: int(p.step))
        steps = [int(p.step) for p in points]
        values = [[float(p.numpy[offset]) for p in points] for offset, _ in weights]
        return {
            "run": run,
            "kind": "step",
            "statistic": statistic,
            "probes": [path for _, path in weights],
            "steps": steps,
            "values": values,
            "thresholds": self._thresholds(ctx, experiment, run),
            "alerts": [],
        }

    def _texts(self, ctx: Any, experiment: str, run: str, tag: str) -> Any:
        """The JSON of the last value of text summary `tag` in `run`, or None."""
        data = self._data_provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=_TEXT,
            downsample=1,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        )
        points = data.get(run, {}).get(tag, [])
        if not points:
            return None
        raw = points[-1].numpy.item()
        try:
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except ValueError:
            return None

    def _probe_order(
        self, ctx: Any, experiment: str, run: str, shown: dict[str, Any]
    ) -> list[str]:
        order = self._texts(ctx, experiment, run, _tags.PROBE_ORDER_TAG)
        order = [p for p in order or [] if p in shown]
        rest = sorted(set(shown) - set(order), key=_natural_key)
        return order + rest

    def _thresholds(self, ctx: Any, experiment: str, run: str) -> dict[str, float]:
        stored = self._texts(ctx, experiment, run, _tags.THRESHOLDS_TAG) or {}
        thresholds = {
            "vanishing": _tags.VANISHING_RATIO,
            "exploding": _tags.EXPLODING_RATIO,
        }
        thresholds.update({str(k): float(v) for k, v in stored.items()})
        return thresholds

    # Routes.

    def _serve_runs(self, request: wrappers.Request) -> Any:
        ctx = plugin_util.context(request.environ)
        experiment = plugin_util.experiment_id(request.environ)
        return http_util.Respond(
            request, {"runs": self.runs(ctx, experiment)}, "application/json"
        )

    def _serve_heatmap(self, request: wrappers.Request) -> Any:
        ctx = plugin_util.context(request.environ)
        experiment = plugin_util.experiment_id(request.environ)
        run = request.args.get("run")
        kind = request.args.get("kind", "epoch")
        statistic = request.args.get("statistic", "grad_norm")
        try:
            downsample = int(request.args.get("downsample", "1000"))
        except ValueError:
            downsample = 0
        if (
            run is None
            or kind not in _tags.PREFIXES
            or not (0 < downsample <= _MAX_DOWNSAMPLE)
        ):
            raise errors.InvalidArgumentError(
                "expected ?run=RUN&kind=epoch|start|batch|step&statistic=NAME"
                f"[&downsample=1..{_MAX_DOWNSAMPLE}]; received "
                f"run={run!r}, kind={kind!r}, downsample="
                f"{request.args.get('downsample')!r}"
            )
        body = self.heatmap(ctx, experiment, run, kind, statistic, downsample)
        return http_util.Respond(request, body, "application/json")

    def _serve_static(self, request: wrappers.Request) -> Any:
        name = request.path.rsplit("/static/", 1)[-1]
        normalized = posixpath.normpath(name)
        if normalized.startswith(("..", "/")) or not os.path.isfile(
            os.path.join(_STATIC, normalized)
        ):
            return http_util.Respond(request, "Not found", "text/plain", code=404)
        path = os.path.join(_STATIC, normalized)
        with open(path, "rb") as file:
            content = file.read()
        mimetype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if path.endswith(".js"):
            mimetype = "text/javascript"
        return http_util.Respond(request, content, mimetype)


def _wsgi(handler: Callable[[wrappers.Request], Any]) -> Callable[..., Any]:
    """A WSGI app from `handler(request) -> response` (what TensorBoard routes
    to; `wrappers.Request.application` does the same for plain functions)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return handler(wrappers.Request(environ))(environ, start_response)

    return app


def _cell_alerts(
    probes: list[str],
    steps: list[int],
    grad_norms: dict[str, dict[int, float]],
    nonfinite: dict[str, dict[int, float]],
    shown: dict[str, dict[int, float]],
    thresholds: dict[str, float],
) -> list[list[Any]]:
    """`[[probe index, step index, alert], ...]` for the cells that alert.

    Alerts: `non-finite` (a NaN/Inf gradient entry: the `nonfinite` count is
    positive, or the shown or `grad_norm` value is not finite), `vanishing`
    / `exploding` (`grad_norm` below / above the stored threshold times the
    `grad_norm` of the last probe with a finite one at that step).
    """
    out: list[list[Any]] = []
    for j, step in enumerate(steps):
        norms = [grad_norms.get(probe, {}).get(step, math.nan) for probe in probes]
        reference = _alerts.reference_norm(norms)
        for i, probe in enumerate(probes):
            value = shown.get(probe, {}).get(step)
            count = nonfinite.get(probe, {}).get(step)
            ratio = norms[i] / reference if reference > 0 else math.nan
            alert = None
            if (count is not None and _alerts.nonfinite(count)) or (
                value is not None and math.isinf(value)
            ):
                alert = "non-finite"
            else:
                alert = _alerts.ratio_alert(
                    ratio, thresholds["vanishing"], thresholds["exploding"]
                )
            if alert is not None:
                out.append([i, j, alert])
    return out
