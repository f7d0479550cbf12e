"""Long runs: `GradientMonitor`'s bounded history, its compact logs, reading
them back (`to_numpy`, `load_report`, `keras-actgrad report`).

The values read back from the logs are compared with an independent
reference, a twin trained by hand (`_monitor_replay.py`), and with the
monitor's own in-memory events (the packed values are float64: equal).
The log size and TensorBoard's stock scalars are checked with TensorBoard's
own reader (`EventAccumulator`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_actgrad
from keras_actgrad import GradientMonitor
from keras_actgrad._statistics.statistics import STATISTICS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _monitor_replay as replay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "weight_grad_norms": "grad_norm",
    "update_norms": "update_norm",
    "update_ratios": "update_ratio",
}

pytestmark = [
    pytest.mark.filterwarnings("ignore:Gradient spike:UserWarning"),
    pytest.mark.filterwarnings("ignore:Vanishing gradient:UserWarning"),
]


def _events_from_columns(columns, probes, paths):
    """`to_numpy`'s columns as events `_monitor_replay.compare` reads."""
    events = []
    for i in range(len(columns["step"])):
        event = {
            "statistics": {
                probe: {
                    name: columns[f"actgrad/{probe}/{name}"][i] for name in STATISTICS
                }
                for probe in probes
            },
            "histograms": {},
            "global_grad_norm": columns["global_grad_norm"][i],
        }
        for field, statistic in FIELDS.items():
            event[field] = {
                path: columns[f"actgrad_weights/{path}/{statistic}"][i]
                for path in paths
            }
        events.append(event)
    return events


@pytest.fixture(scope="module")
def bounded_run(tmp_path_factory):
    """The replay model trained 8 steps, the monitor keeping 3 events; with a
    spike at the last step (every statistic, a change of the packed columns)
    and histograms every 3 steps."""
    log_dir = tmp_path_factory.mktemp("bounded")
    model = replay.build()
    monitor = GradientMonitor(
        statistics=None,
        histograms_every_n_steps=3,
        spike_factor=5.0,
        log_dir=str(log_dir),
        max_events=3,
    )
    replay.fit(model, [monitor])
    return model, monitor, log_dir


def test_events_are_bounded_and_to_numpy_reads_every_step_from_the_logs(
    bounded_run,
):
    model, monitor, _ = bounded_run
    steps = replay.N // replay.BATCH
    assert [event["step"] for event in monitor.events] == [
        steps - 2,
        steps - 1,
        steps,
    ]
    columns = monitor.to_numpy()
    assert columns["step"].tolist() == list(range(1, steps + 1))
    assert columns["epoch"].tolist() == [0.0] * steps
    # The last three rows are the events kept in memory, bit for bit.
    probes = monitor.probe_order
    paths = [v.path for v in model.trainable_variables]
    from_logs = _events_from_columns(columns, probes, paths)
    for event, logged in zip(monitor.events, from_logs[-3:], strict=True):
        assert logged["global_grad_norm"] == event["global_grad_norm"]
        for probe in probes:
            for name, value in event["statistics"][probe].items():
                np.testing.assert_equal(logged["statistics"][probe][name], value)
        for field in FIELDS:
            assert list(logged[field].values()) == list(event[field].values())
    assert monitor.events[-1]["spike"]


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="the hand-trained twin (_monitor_replay) is TensorFlow and JAX",
)
def test_every_step_read_from_the_logs_matches_a_replay_by_hand(bounded_run):
    model, monitor, log_dir = bounded_run
    reference, _ = replay.replay()
    probes = monitor.probe_order
    paths = [v.path for v in model.trainable_variables]
    from_logs = _events_from_columns(monitor.to_numpy(), probes, paths)
    assert replay.compare(from_logs, reference) < 1e-4
    # The report of the step events: every step, the same grad_norm.
    report = keras_actgrad.load_report(str(log_dir))
    assert report.kind == "step"
    assert report.epochs == list(range(1, len(reference) + 1))
    assert report.probes == probes
    want = np.array(
        [[step["statistics"][p]["grad_norm"] for step in reference] for p in probes]
    )
    np.testing.assert_allclose(report.matrix("grad_norm"), want, rtol=1e-4)
    assert "step 1" in report.table() and f"step {len(reference)}" in report.table()


def test_step_report_alerts_and_selection_match_the_epoch_rules(tmp_path):
    """The vectorized alerts of a step report, on hand-written rows."""
    from keras_actgrad._statistics.statistics import Reduced
    from keras_actgrad._tensorboard import EventWriter

    writer = EventWriter(str(tmp_path), thresholds={"vanishing": 1e-2})
    order = ["a", "b", "c"]
    rows = {  # step: (grad_norm, nonfinite) of a, b, c
        1: [(1.0, 0), (1.0, 0), (1.0, 0)],
        2: [(1e-3, 0), (1.0, 0), (1.0, 0)],  # a vanishes (ratio 1e-3 < 1e-2)
        # a has no gradient (NaN count); c non-finite, and its ratio to the
        # last finite norm (b's) is infinite: exploding too.
        3: [(np.nan, np.nan), (2.0, 0), (np.inf, 5)],
        4: [(1.0, 0), (1.0, 0), (1.0, 0)],
    }
    names = ["grad_norm", "nonfinite"]
    columns = ["epoch", "global_grad_norm"]
    columns += [f"actgrad/{p}/{n}" for p in order for n in names]
    for step, cells in rows.items():
        statistics = {
            p: dict(zip(names, cell, strict=True))
            for p, cell in zip(order, cells, strict=True)
        }
        values = [0.0, 1.0] + [v for cell in cells for v in cell]
        writer.write(
            "step",
            step,
            Reduced(statistics, {}, {}),
            names,
            order,
            packed=(columns, values),
        )
    writer.close()
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.kind == "step" and report.epochs == [1, 2, 3, 4]
    assert report.thresholds == {"vanishing": 1e-2}
    assert report.alerts() == {
        "a": ["vanishing (step 2)", "no gradient (step 3)"],
        "b": [],
        "c": ["non-finite (step 3)", "exploding (step 3)"],
    }
    assert report.select("a").alerts()["a"] == report.alerts()["a"]
    assert dict(report.values["grad_norm"]["b"]) == {1: 1.0, 2: 1.0, 3: 2.0, 4: 1.0}
    with pytest.raises(ValueError, match="kind"):
        keras_actgrad.load_report(str(tmp_path), kind="batch")
    with pytest.raises(ValueError, match="epoch events"):
        keras_actgrad.load_report(str(tmp_path), kind="epoch")


def test_max_events_is_validated():
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(ValueError, match="max_events"):
            GradientMonitor(max_events=bad)
    assert GradientMonitor(max_events=None).max_events is None
    assert GradientMonitor().max_events == 1000


def test_report_command_imports_neither_tensorflow_nor_keras(bounded_run):
    """`keras-actgrad report` prints its table and nothing else, and reads
    the logs without importing TensorFlow, Keras or a backend."""
    _, _, log_dir = bounded_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = (
        "import sys\n"
        "from keras_actgrad.__main__ import main\n"
        f"code = main(['report', {str(log_dir)!r}])\n"
        "heavy = {m.split('.')[0] for m in sys.modules}\n"
        "heavy &= {'tensorflow', 'keras', 'jax', 'torch'}\n"
        "print('HEAVY', sorted(heavy), code, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert result.stderr == "HEAVY [] 0\n"
    expected = keras_actgrad.load_report(str(log_dir)).table()
    assert result.stdout == expected + "\n"
    command = subprocess.run(
        [sys.executable, "-m", "keras_actgrad", "report", str(log_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert (command.stdout, command.stderr) == (expected + "\n", "")


@pytest.mark.one_backend("jax", reason="the log format is the backends' same")
def test_the_issue_mlp_writes_at_most_8_kb_a_step_with_stock_scalars(tmp_path):
    """50 Dense(32) with a probe after each (101 variables), batch 8, the
    monitor at its defaults: <= 8 KB per step, and TensorBoard's own reader
    finds the global norm and every probe's grad_norm as stock scalars."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32,))
    h = inputs
    for i in range(50):
        h = keras.layers.Dense(32, activation="tanh", name=f"dense_{i}")(h)
        h = keras_actgrad.GradientProbe(name=f"probe_{i}")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False)(h))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    assert len(model.trainable_variables) == 101
    steps = 24
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 32)).astype("float32")
    y = rng.normal(size=(8 * steps, 1)).astype("float32")
    monitor = GradientMonitor(log_dir=str(tmp_path))
    model.fit(x, y, batch_size=8, verbose=0, callbacks=[monitor])
    folder = tmp_path / "actgrad"
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size / steps <= 8192, size / steps
    accumulator = event_accumulator.EventAccumulator(
        str(folder), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    columns = monitor.to_numpy()
    for i in (0, 49):
        tag = f"actgrad_step.grad_norm/probe_{i}"
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        got = [
            float(tensor_util.make_ndarray(e.tensor_proto))
            for e in accumulator.Tensors(tag)
        ]
        want = columns[f"actgrad/probe_{i}/grad_norm"]
        np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 scalars
    tag = "actgrad_step.global_grad_norm/model"
    assert [e.step for e in accumulator.Tensors(tag)] == list(range(1, steps + 1))
