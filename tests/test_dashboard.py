"""The `actgrad` TensorBoard plugin, through a live `tensorboard` server.

The server finds the plugin through the `tensorboard_plugins` entry point
the package declares (a dist-info on the server's path declares the same
one, so that a stale editable install does not matter; the wheel test
checks what the package really ships), so what is tested is TensorBoard's
own plugin discovery.

The page is checked in a real headless Chromium (the system package
`chromium`): a screenshot whose heatmap region must hold many distinct
colours. Without chromium the browser test is skipped, unless `CI` is set,
where it fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.parse  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad import ActivationGradientCallback  # noqa: E402

# The deep sigmoid stacks below vanish on purpose: the alerts are the subject.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Vanishing gradient:UserWarning"),
    # The plugin reads event files; the callback writes them the same on
    # every backend (test_tensorboard.py, test_callback.py).
    pytest.mark.one_backend("torch", reason="a tensorboard server and Chromium"),
]

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT = "actgrad = tensorboard_plugin_actgrad:ActgradLoader"


def deep_model(depth=10, seed=0):
    """A sigmoid MLP whose gradient shrinks layer by layer towards the input."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = inputs
    for i in range(depth):
        h = keras.layers.Dense(8, activation="sigmoid", name=f"dense_{i}")(h)
        h = keras_actgrad.GradientProbe(name=f"probe_{i}")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    return model, x, y


def server_env(tmp_path):
    """The server's environment: this checkout first on its path, and a
    `keras_actgrad` dist-info declaring the entry point, which shadows the
    installed package's metadata (an editable install may predate the entry
    point; `importlib.metadata` takes the first distribution of a name)."""
    site = tmp_path / "site"
    info = site / "keras_actgrad-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: keras-actgrad\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[tensorboard_plugins]\n{ENTRY_POINT}\n")
    env = dict(os.environ)
    paths = [str(ROOT), str(site), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def test_the_wheel_ships_the_plugin_and_its_entry_point(tmp_path):
    import zipfile

    pytest.importorskip("setuptools", reason="builds the wheel without isolation")

    # A copy: building without isolation writes build/ and *.egg-info.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "keras_actgrad",
        source / "keras_actgrad",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md", "tensorboard_plugin_actgrad.py"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("keras_actgrad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        declared = archive.read(entry_points).decode()
    assert "keras_actgrad/_dashboard/plugin.py" in names
    assert "tensorboard_plugin_actgrad.py" in names
    assert "keras_actgrad/_dashboard/static/index.js" in names
    assert f"[tensorboard_plugins]\n{ENTRY_POINT}" in declared


def test_tensorboard_starts_when_keras_cannot_be_imported(tmp_path, tensorboard_server):
    """Where Keras has no backend (TensorFlow missing, no `KERAS_BACKEND`),
    TensorBoard starts, with the tab: the dashboard imports neither Keras
    nor TensorFlow (and the loader would import a failing one in `load`,
    where TensorBoard catches the error)."""
    hidden = tmp_path / "hidden" / "tensorflow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("hidden by a test")\n')
    env = server_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(hidden.parent), env["PYTHONPATH"]])
    env.pop("KERAS_BACKEND", None)  # Keras's default backend: tensorflow
    env["KERAS_HOME"] = str(tmp_path / "keras_home")  # no keras.json
    server = tensorboard_server(tmp_path, env=env)
    listing = server.wait_for_json(
        "/data/plugins_listing", lambda value: "scalars" in value, default={}
    )
    assert "scalars" in listing and "actgrad" in listing


def heatmap(server, run, kind, statistic):
    query = urllib.parse.urlencode({"run": run, "kind": kind, "statistic": statistic})
    return json.loads(server.get(f"/data/plugin/actgrad/heatmap?{query}"))


def number(value):
    return value if isinstance(value, (int, float)) else float(value)


def test_routes_serve_the_callback_events(tmp_path, tensorboard_server):
    model, x, y = deep_model()
    callback = ActivationGradientCallback(
        (x[:16], y[:16]),
        log_dir=str(tmp_path / "logs"),
        batch_freq=2,
        vanishing_threshold=0.05,
    )
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    server = tensorboard_server(tmp_path / "logs", env=server_env(tmp_path))
    listing = server.wait_for_json(
        "/data/plugins_listing",
        lambda value: value.get("actgrad", {}).get("enabled", False),
        default={},
    )
    assert listing["actgrad"]["enabled"]
    assert listing["actgrad"]["loading_mechanism"] == {
        "type": "IFRAME",
        "module_path": "/data/plugin/actgrad/static/index.js",
    }
    runs = server.wait_for_json(
        "/data/plugin/actgrad/runs",
        lambda value: (
            len(value.get("runs", [])) == 1 and "batch" in value["runs"][0]["kinds"]
        ),
        default={},
    )["runs"]
    assert runs[0]["run"] == "actgrad"
    assert set(runs[0]["kinds"]) == {"epoch", "batch"}
    assert "grad_norm" in runs[0]["kinds"]["epoch"]

    data = heatmap(server, "actgrad", "epoch", "grad_norm")
    assert data["probes"] == callback.probe_order
    assert data["steps"] == [0, 1, 2]
    epochs = [event for event in callback.events if event["kind"] == "epoch"]
    for j, event in enumerate(epochs):
        for i, probe in enumerate(data["probes"]):
            expected = event["statistics"][probe]["grad_norm"]
            assert number(data["values"][i][j]) == pytest.approx(expected, rel=1e-6)
    assert data["thresholds"] == {"vanishing": 0.05, "exploding": 1e4}
    # Alerts, recomputed by hand: grad_norm over the last probe's, per epoch.
    expected_alerts = []
    for j, event in enumerate(epochs):
        norms = [event["statistics"][p]["grad_norm"] for p in data["probes"]]
        for i, norm in enumerate(norms):
            if norm / norms[-1] < 0.05:
                expected_alerts.append([i, j, "vanishing"])
    assert expected_alerts, "the sigmoid stack should vanish below 0.05"
    assert sorted(data["alerts"]) == sorted(expected_alerts)

    batch = heatmap(server, "actgrad", "batch", "act_mean")
    assert batch["steps"] == [2, 4, 6, 8, 10, 12]
    assert len(batch["values"]) == len(callback.probe_order)

    # The page's own files are served; a bad request is an error, not a crash.
    script = server.get("/data/plugin/actgrad/static/index.js").decode()
    assert "export async function render" in script
    for query in ("kind=nope&run=actgrad", "run=actgrad&statistic=nope", ""):
        with pytest.raises(OSError):
            server.get(f"/data/plugin/actgrad/heatmap?{query}")
    with pytest.raises(OSError):
        server.get("/data/plugin/actgrad/static/../plugin.py")


def test_heatmap_follows_training(tmp_path, tensorboard_server):
    """New events appear in the routes as training writes them."""
    model, x, y = deep_model(depth=3)
    log_dir = tmp_path / "logs"
    first = ActivationGradientCallback((x[:16], y[:16]), log_dir=str(log_dir))
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[first])
    server = tensorboard_server(log_dir, env=server_env(tmp_path))
    server.wait_for_json(
        "/data/plugin/actgrad/runs", lambda v: bool(v.get("runs")), default={}
    )
    assert heatmap(server, "actgrad", "epoch", "grad_norm")["steps"] == [0, 1]
    more = ActivationGradientCallback((x[:16], y[:16]), log_dir=str(log_dir))
    model.fit(
        x, y, epochs=4, initial_epoch=2, batch_size=8, verbose=0, callbacks=[more]
    )
    query = "run=actgrad&kind=epoch&statistic=grad_norm"
    data = server.wait_for_json(
        f"/data/plugin/actgrad/heatmap?{query}",
        lambda v: v.get("steps") == [0, 1, 2, 3],
        default={},
    )
    assert data["steps"] == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:Gradient spike:UserWarning")
def test_monitor_run_shows_probes_and_weights_by_step(tmp_path, tensorboard_server):
    """A `GradientMonitor` run: the probes' grad_norm (stock scalars) and the
    weights' norms (packed step values, with a spike step whose columns
    differ) by step, equal to what the monitor computed."""
    model, x, y = deep_model(depth=3)
    y[-8:] *= 100.0  # the last step of each epoch: a large gradient
    monitor = keras_actgrad.GradientMonitor(
        log_dir=str(tmp_path / "logs"), spike_factor=3.0
    )
    model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[monitor]
    )
    assert monitor.events[-1]["spike"]  # after 5 steps of warm-up
    server = tensorboard_server(tmp_path / "logs", env=server_env(tmp_path))
    runs = server.wait_for_json(
        "/data/plugin/actgrad/runs", lambda v: bool(v.get("runs")), default={}
    )["runs"]
    statistics = runs[0]["kinds"]["step"]
    assert "grad_norm" in statistics and "weights: update_ratio" in statistics
    steps = [event["step"] for event in monitor.events]
    data = heatmap(server, "actgrad", "step", "grad_norm")
    assert data["probes"] == monitor.probe_order and data["steps"] == steps
    for i, probe in enumerate(data["probes"]):
        expected = [e["statistics"][probe]["grad_norm"] for e in monitor.events]
        got = [number(v) for v in data["values"][i]]
        assert got == pytest.approx(expected, rel=1e-6)  # float32 scalars
    paths = [v.path for v in model.trainable_variables]
    for statistic, field in (
        ("grad_norm", "weight_grad_norms"),
        ("update_ratio", "update_ratios"),
    ):
        data = heatmap(server, "actgrad", "step", f"weights: {statistic}")
        assert data["probes"] == paths and data["steps"] == steps
        for i, path in enumerate(paths):
            expected = [event[field][path] for event in monitor.events]
            assert [number(v) for v in data["values"][i]] == expected  # float64


def test_nonfinite_and_missing_cells(tmp_path, tensorboard_server):
    """Inf and NaN values reach the page as strings and mark alerts."""
    from keras_actgrad._tensorboard import EventWriter

    writer = EventWriter(str(tmp_path), thresholds={"vanishing": 1e-3})
    rows = {
        "a": {"grad_norm": math.inf, "nonfinite": 3.0},
        "b": {"grad_norm": math.nan, "nonfinite": math.nan},
        "c": {"grad_norm": 2.0, "nonfinite": 0.0},
    }
    write_event(writer, "epoch", 0, rows, ["a", "b", "c"])
    writer.close()
    server = tensorboard_server(tmp_path, env=server_env(tmp_path))
    server.wait_for_json(
        "/data/plugin/actgrad/runs", lambda v: bool(v.get("runs")), default={}
    )
    data = heatmap(server, "actgrad", "epoch", "grad_norm")
    assert data["probes"] == ["a", "b", "c"]
    assert data["values"] == [["Infinity"], ["NaN"], [2.0]]
    assert data["alerts"] == [[0, 0, "non-finite"]]
    assert data["thresholds"]["vanishing"] == 1e-3


def write_event(writer, kind, step, rows, order):
    from keras_actgrad._statistics.statistics import Reduced

    reduced = Reduced(statistics=rows, histograms={}, weight_grad_norms={})
    assert writer.write(kind, step, reduced, ["grad_norm", "nonfinite"], order)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail(
            "CI needs chromium for the dashboard test: apt-get install chromium"
        )
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browser(tmp_path, *arguments):
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=10000",
        *arguments,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_page_draws_the_heatmap_in_chromium(tmp_path, tensorboard_server):
    from PIL import Image

    model, x, y = deep_model(depth=12)
    callback = ActivationGradientCallback(
        (x[:16], y[:16]), log_dir=str(tmp_path / "logs"), vanishing_threshold=0.05
    )
    model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[callback])
    server = tensorboard_server(tmp_path / "logs", env=server_env(tmp_path))
    server.wait_for_json(
        "/data/plugin/actgrad/runs", lambda v: bool(v.get("runs")), default={}
    )
    page = f"http://127.0.0.1:{server.port}/data/plugin_entry.html?name=actgrad"
    dom = browser(tmp_path, "--dump-dom", page)
    assert 'data-cells="48"' in dom  # 12 probes x 4 epochs drawn
    assert "canvas" in dom
    shot = tmp_path / "dashboard.png"
    browser(tmp_path, f"--screenshot={shot}", "--window-size=1000,800", page)
    image = np.asarray(Image.open(shot).convert("RGB"))
    # The heatmap's cells: blocks of one colour each, of at least 100 pixels,
    # in colour (not white, grey or black), other than the red alert frame.
    # The colour bar's gradient has no colour of that size.
    pixels = image.reshape(-1, 3).astype(int)
    coloured = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 40]
    colours, counts = np.unique(coloured, axis=0, return_counts=True)
    cells = [tuple(c) for c, n in zip(colours, counts, strict=True) if n >= 100]
    cells = [c for c in cells if c != (0xE8, 0x33, 0x2A)]
    assert len(cells) >= 10, f"{len(cells)} cell colours in the screenshot"
