"""The report command and `load_report`, on event files written as the
callback's TensorBoard contract says (tf.summary, `<log_dir>/actgrad/`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras_actgrad  # noqa: E402
from keras_actgrad.__main__ import main  # noqa: E402

# Deliberately not alphabetical: the table must follow `actgrad/probe_order`.
PROBES = ["input_probe", "conv_probe", "a_dense_probe", "logits_probe"]
EPOCHS = [0, 2, 4]  # probed every other epoch


def grad_norm(probe_index: int, epoch: int) -> float:
    # The first probe vanishes (1e-6 of the logits probe's) from epoch 2 on.
    if probe_index == 0:
        return 1e-3 if epoch == 0 else 1e-6
    return 0.5 * (probe_index + 1) * (1 + epoch)


def write_contract_events(log_dir, *, start=False, nonfinite_at=None, text=True):
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "actgrad"))
    with writer.as_default():
        if start:
            for i, probe in enumerate(PROBES):
                tf.summary.scalar(f"actgrad_start/{probe}/grad_norm", 10.0 + i, step=0)
        for epoch in EPOCHS:
            for i, probe in enumerate(PROBES):
                norm = grad_norm(i, epoch)
                count = 0.0
                if nonfinite_at == (probe, epoch):
                    norm, count = float("nan"), 3.0
                tf.summary.scalar(f"actgrad/{probe}/grad_norm", norm, step=epoch)
                tf.summary.scalar(f"actgrad/{probe}/nonfinite", count, step=epoch)
                dead = 0.75 if probe == "conv_probe" and epoch == 4 else 0.0
                scalar = tf.summary.scalar
                scalar(f"actgrad/{probe}/dead_unit_fraction", dead, step=epoch)
                scalar(f"actgrad/{probe}/act_std", 0.25 * (i + 1), step=epoch)
                tf.summary.histogram(f"actgrad/{probe}/gradient", [1.0], step=epoch)
            if text:
                tf.summary.text("actgrad/probe_order", json.dumps(PROBES), step=epoch)
            # Batch-level and weight events must not enter the epoch table.
            tf.summary.scalar(f"actgrad_batch/{PROBES[0]}/grad_norm", 99.0, step=epoch)
            tf.summary.scalar("actgrad_weights/dense/kernel/grad_norm", 7.0, step=epoch)
    writer.close()
    return str(log_dir)


def rows(output):
    """Table rows keyed by probe name (lines after the dashed rule)."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "})
    body = [line for line in lines[rule + 1 :] if line.strip()]
    table = {}
    for line in body:
        if line.startswith("heatmap"):
            break
        table[line.split()[0]] = line
    return lines[rule - 1], table


def test_load_report_reads_the_contract(tmp_path):
    log_dir = write_contract_events(tmp_path, start=True)
    report = keras_actgrad.load_report(log_dir)
    assert report.probes == PROBES
    assert report.epochs == EPOCHS
    assert set(report.statistics) == {
        "grad_norm",
        "nonfinite",
        "dead_unit_fraction",
        "act_std",
    }
    matrix = report.matrix("grad_norm")
    expected = [[grad_norm(i, e) for e in EPOCHS] for i in range(len(PROBES))]
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    assert report.start["grad_norm"] == pytest.approx(
        {probe: 10.0 + i for i, probe in enumerate(PROBES)}
    )


def test_table_rows_values_trend_and_alerts(tmp_path, capsys):
    log_dir = write_contract_events(tmp_path)
    assert main(["report", log_dir]) == 0
    header, table = rows(capsys.readouterr().out)
    assert header.split() == ["probe", "epoch", "0", "epoch", "4", "trend", "alerts"]
    assert list(table) == PROBES  # forward order, not alphabetical
    # logits_probe: 0.5 * 4 * 1 = 2 at epoch 0, 2 * 5 = 10 at epoch 4.
    assert table["logits_probe"].split()[1:5] == ["2", "10", "\u2191", "x5"]
    assert table["logits_probe"].rstrip().endswith("-")
    # input_probe falls from 1e-3 to 1e-6: 1e-6 / (2 * 3) < 1e-4 at epoch 2.
    assert table["input_probe"].split()[1:5] == ["0.001", "1e-06", "\u2193", "x0.001"]
    assert "vanishing (epoch 2)" in table["input_probe"]
    # conv_probe: 75% dead units at epoch 4 (threshold 0.5).
    assert "dead units (epoch 4)" in table["conv_probe"]
    assert "vanishing" not in table["conv_probe"]
    assert "exploding" not in table["a_dense_probe"]


def test_thresholds_are_options(tmp_path, capsys):
    log_dir = write_contract_events(tmp_path)
    # 1e-3 / 2 = 5e-4 at epoch 0: vanishing for a threshold of 1e-3.
    args = ["report", log_dir, "--vanishing", "1e-3", "--dead-units", "0.9"]
    assert main(args) == 0
    _, table = rows(capsys.readouterr().out)
    assert "vanishing (epoch 0)" in table["input_probe"]
    assert "dead units" not in table["conv_probe"]
    # The logits probe is the reference; others exceed 0.1 x its norm.
    assert main(["report", log_dir, "--exploding", "0.1"]) == 0
    _, table = rows(capsys.readouterr().out)
    assert "exploding (epoch 0)" in table["a_dense_probe"]


def test_nonfinite_alert_names_the_epoch(tmp_path, capsys):
    log_dir = write_contract_events(tmp_path, nonfinite_at=("conv_probe", 2))
    assert main(["report", log_dir]) == 0
    _, table = rows(capsys.readouterr().out)
    assert "non-finite (epoch 2)" in table["conv_probe"]
    assert "non-finite" not in table["a_dense_probe"]


def write_run(log_dir, epochs, scale):
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "actgrad"))
    with writer.as_default():
        tf.summary.scalar("actgrad_start/p/grad_norm", scale, step=0)
        for epoch in epochs:
            tf.summary.scalar("actgrad/p/grad_norm", scale * (epoch + 1), step=epoch)
            tf.summary.text("actgrad/probe_order", '["p"]', step=epoch)
    writer.close()


def test_a_new_run_in_the_same_log_dir_replaces_the_old_one(tmp_path):
    write_run(tmp_path, [0, 1, 2], scale=1.0)
    write_run(tmp_path, [0, 1], scale=10.0)  # a second `fit` from epoch 0
    assert len(os.listdir(tmp_path / "actgrad")) == 2
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.epochs == [0, 1]  # not epoch 2 of the first run
    assert report.values["grad_norm"]["p"] == {0: 10.0, 1: 20.0}
    assert report.start["grad_norm"]["p"] == 10.0


def test_a_continued_run_adds_its_epochs(tmp_path):
    write_run(tmp_path, [0, 1], scale=1.0)
    write_run(tmp_path, [2, 3], scale=10.0)  # `fit(initial_epoch=2)`
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.values["grad_norm"]["p"] == {0: 1.0, 1: 2.0, 2: 30.0, 3: 40.0}


def test_probe_without_gradient_is_not_called_non_finite(tmp_path, capsys):
    # The callback logs NaN for every gradient statistic of a probe that does
    # not reach the loss; a NaN gradient entry shows as a positive count.
    writer = tf.summary.create_file_writer(str(tmp_path / "actgrad"))
    with writer.as_default():
        for epoch in (0, 1):
            for probe, norm, count in [
                ("cut_probe", float("nan"), float("nan")),
                ("nan_probe", float("nan"), 2.0),
                ("small_probe", 1e-5, 0.0),
                ("head_probe", 1.0, 0.0),
                ("aux_probe", float("nan"), float("nan")),  # last, no gradient
            ]:
                tf.summary.scalar(f"actgrad/{probe}/grad_norm", norm, step=epoch)
                tf.summary.scalar(f"actgrad/{probe}/nonfinite", count, step=epoch)
            order = json.dumps(
                ["cut_probe", "nan_probe", "small_probe", "head_probe", "aux_probe"]
            )
            tf.summary.text("actgrad/probe_order", order, step=epoch)
    writer.close()
    alerts = keras_actgrad.load_report(str(tmp_path)).alerts()
    # The vanishing reference is head_probe, the last probe with a gradient.
    assert alerts == {
        "cut_probe": ["no gradient (epoch 0)"],
        "nan_probe": ["non-finite (epoch 0)"],
        "small_probe": ["vanishing (epoch 0)"],
        "head_probe": [],
        "aux_probe": ["no gradient (epoch 0)"],
    }
    assert main(["report", str(tmp_path)]) == 0
    _, table = rows(capsys.readouterr().out)
    assert table["cut_probe"].split()[1:4] == ["nan", "nan", "?"]


def test_start_column_and_other_statistic(tmp_path, capsys):
    log_dir = write_contract_events(tmp_path, start=True)
    assert main(["report", log_dir]) == 0
    header, table = rows(capsys.readouterr().out)
    assert header.split()[:2] == ["probe", "start"]
    assert table["conv_probe"].split()[1:3] == ["11", "1"]  # start, epoch 0
    # act_std has no `probe_at_start` event here: no start column.
    assert main(["report", log_dir, "--statistic", "act_std"]) == 0
    out = capsys.readouterr().out
    header, table = rows(out)
    assert out.splitlines()[0].startswith("act_std per probe")
    assert header.split()[:2] == ["probe", "epoch"]
    # act_std is 0.25 * (i + 1) at every epoch: a flat trend.
    assert table["conv_probe"].split()[1:5] == ["0.5", "0.5", "\u2192", "x1"]


def test_without_probe_order_falls_back_to_sorted_names(tmp_path):
    log_dir = write_contract_events(tmp_path, text=False)
    assert keras_actgrad.load_report(log_dir).probes == sorted(PROBES)


def test_actgrad_subdirectory_itself_is_accepted(tmp_path):
    write_contract_events(tmp_path)
    report = keras_actgrad.load_report(str(tmp_path / "actgrad"))
    assert report.probes == PROBES


def test_png_heatmap_is_written_and_not_blank(tmp_path, capsys):
    from matplotlib import image

    log_dir = write_contract_events(tmp_path)
    png = tmp_path / "heat.png"
    assert main(["report", log_dir, "--png", str(png)]) == 0
    assert f"heatmap saved to {png}" in capsys.readouterr().out
    pixels = image.imread(str(png))
    height, width = pixels.shape[:2]
    assert height > 200 and width > 400
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 50  # a colour map, text and a colour bar, not a blank


def test_heatmap_marks_alerts_with_the_options_thresholds(tmp_path, monkeypatch):
    # The table and the heatmap judge alerts alike: the options reach both.
    log_dir = write_contract_events(tmp_path)
    seen = []
    alerts = keras_actgrad.Report.alerts

    def recording(self, *args):
        seen.append(args)
        return alerts(self, *args)

    monkeypatch.setattr(keras_actgrad.Report, "alerts", recording)
    png = str(tmp_path / "heat.png")
    args = ["--vanishing", "1e-3", "--exploding", "50", "--dead-units", "0.9"]
    assert main(["report", log_dir, "--png", png, *args]) == 0
    assert seen == [(1e-3, 50.0, 0.9)] * 2  # the table, then the heatmap


def test_unknown_statistic_exits_2(tmp_path, capsys):
    log_dir = write_contract_events(tmp_path)
    assert main(["report", log_dir, "--statistic", "grad_nrom"]) == 2
    err = capsys.readouterr().err
    assert "no statistic 'grad_nrom'" in err and "grad_norm" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "keras_tensorboard_only"])
def test_no_events_exit_2_with_one_line(tmp_path, capsys, case):
    log_dir = tmp_path / "logs"
    if case != "missing":
        log_dir.mkdir()
    if case == "keras_tensorboard_only":
        writer = tf.summary.create_file_writer(str(log_dir / "train"))
        with writer.as_default():
            tf.summary.scalar("epoch_loss", 1.0, step=0)
        writer.close()
    assert main(["report", str(log_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-actgrad: error:")
    assert str(log_dir) in lines[0]


def test_non_actgrad_events_in_actgrad_dir_exit_2(tmp_path, capsys):
    writer = tf.summary.create_file_writer(str(tmp_path / "actgrad"))
    with writer.as_default():
        tf.summary.scalar("epoch_loss", 1.0, step=0)
    writer.close()
    assert main(["report", str(tmp_path)]) == 2
    assert "no `actgrad/...` scalars" in capsys.readouterr().err


def test_python_m_entry_point_exit_2_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "keras_actgrad", "report", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    ours = [line for line in done.stderr.splitlines() if "keras-actgrad" in line]
    assert ours == [
        f"keras-actgrad: error: Log directory '{missing}' does not exist. Pass "
        "the `log_dir` given to `ActivationGradientCallback`. "
        f"Received: log_dir='{missing}'."
    ]


def test_report_of_a_real_callback_run(tmp_path, capsys):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="first")(inputs)
    h = keras.layers.Dense(4, activation="tanh", name="second")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    model = keras_actgrad.insert_probes(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    callback = keras_actgrad.ActivationGradientCallback(
        (x[:16], y[:16]), log_dir=str(tmp_path), freq=[0, 2], histograms=False
    )
    model.fit(x, y, epochs=3, batch_size=8, callbacks=[callback], verbose=0)
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.probes == ["first_probe", "second_probe", "head_probe"]
    assert report.epochs == [0, 2]
    # The last probed epoch is the end of training: recompute its gradients
    # with `activation_gradients` and take the L2 norm in NumPy.
    results = keras_actgrad.activation_gradients(model, x[:16], y[:16])
    for probe in report.probes:
        want = np.linalg.norm(results[probe].gradient)
        got = report.values["grad_norm"][probe][2]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # (Exact: on JAX `1 - mean(alive)` once gave -3e-8 for no dead unit.)
        dead = np.mean(np.all(results[probe].activation == 0, axis=0))
        assert report.values["dead_unit_fraction"][probe][2] == pytest.approx(dead)
    assert main(["report", str(tmp_path), "--png", str(tmp_path / "r.png")]) == 0
    header, table = rows(capsys.readouterr().out)
    assert header.split()[:5] == ["probe", "epoch", "0", "epoch", "2"]
    assert list(table) == report.probes
    want = f"{np.linalg.norm(results['head_probe'].gradient):.3g}"
    assert table["head_probe"].split()[2] == want


def test_report_uses_the_callbacks_thresholds(tmp_path, capsys):
    model, x, y = small_probed_model()
    # Any ratio to the last probe is below 10: every epoch is "vanishing".
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y),
        log_dir=str(tmp_path),
        histograms=False,
        vanishing_threshold=10.0,
        exploding_threshold=1e6,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=2, batch_size=8, callbacks=[callback], verbose=0)
    assert any("vanishing" in str(w.message) for w in caught)
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.thresholds == {"vanishing": 10.0, "exploding": 1e6}
    assert report.alerts()["first_probe"] == ["vanishing (epoch 0)"]
    assert main(["report", str(tmp_path)]) == 0
    _, table = rows(capsys.readouterr().out)
    assert "vanishing (epoch 0)" in table["first_probe"]
    # An explicit option still wins over the stored threshold.
    assert main(["report", str(tmp_path), "--vanishing", "1e-4"]) == 0
    _, table = rows(capsys.readouterr().out)
    assert "vanishing" not in table["first_probe"]
    # Logs without stored thresholds use the callback's defaults.
    contract = write_contract_events(tmp_path / "old")
    assert keras_actgrad.load_report(contract).thresholds == {}


def small_probed_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="first")(inputs)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    return keras_actgrad.insert_probes(model), x, y


def test_profile_images_in_tensorboard(tmp_path):
    import io

    from matplotlib import image
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    model, x, y = small_probed_model()
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), histograms=False, profile_images=True
    )
    model.fit(x, y, epochs=2, batch_size=8, callbacks=[callback], verbose=0)
    accumulator = ea.EventAccumulator(
        str(tmp_path / "actgrad"), size_guidance={ea.TENSORS: 0}
    )
    accumulator.Reload()
    tag = "actgrad/grad_norm_profile"
    assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images"
    events = accumulator.Tensors(tag)
    assert [event.step for event in events] == [0, 1]
    for event in events:
        width, height, png = tensor_util.make_ndarray(event.tensor_proto)
        pixels = image.imread(io.BytesIO(png))
        assert pixels.shape[:2] == (int(height), int(width))


def test_profile_png_draws_log_scale_bars():
    import io

    from matplotlib import image

    from keras_actgrad._plots import profile_png

    png, width, height = profile_png(
        ["big", "small", "broken"], [1e-1, 1e-4, float("nan")], "t"
    )
    pixels = image.imread(io.BytesIO(png))[..., :3]
    assert pixels.shape[:2] == (height, width)
    blue = np.all(np.abs(pixels - np.array([0x2A, 0x78, 0x8E]) / 255) < 0.02, axis=-1)
    red = np.all(np.abs(pixels - np.array([0xC0, 0x39, 0x2B]) / 255) < 0.02, axis=-1)
    columns = np.flatnonzero(blue.any(axis=0))
    bars = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert len(bars) == 2
    heights = [blue[:, bar].sum(axis=0).max() for bar in bars]
    # Log scale from 1e-5 (a tenth of the smallest value): 4 decades against
    # 1 decade, so the first bar is about 4 times as tall.
    assert 3.5 < heights[0] / heights[1] < 4.5
    assert red[:, columns.max() + 5 :].any()  # the NaN bar, in red, to the right


def test_profile_images_needs_log_dir():
    with pytest.raises(ValueError, match="needs `log_dir`"):
        keras_actgrad.ActivationGradientCallback(
            (np.zeros((2, 6)), np.zeros((2, 3))), profile_images=True
        )


def test_failed_profile_image_warns_and_keeps_scalars(tmp_path, monkeypatch):
    from keras_actgrad import _plots

    def broken(*args):
        raise RuntimeError("no display")

    monkeypatch.setattr(_plots, "profile_png", broken)
    model, x, y = small_probed_model()
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), histograms=False, profile_images=True
    )
    # (`pytest.warns` would re-emit third-party warnings as errors.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=2, batch_size=8, callbacks=[callback], verbose=0)
    ours = [
        w for w in caught if "could not draw the grad_norm profile" in str(w.message)
    ]
    assert len(ours) == 1 and "no display" in str(ours[0].message)  # warned once
    report = keras_actgrad.load_report(str(tmp_path))
    assert report.epochs == [0, 1]


@pytest.mark.one_backend("torch", reason="a tensorboard server")
def test_tensorboard_server_shows_the_profile_image(tmp_path, tensorboard_server):
    import io
    import urllib.parse

    from matplotlib import image as image_module

    model, x, y = small_probed_model()
    callback = keras_actgrad.ActivationGradientCallback(
        (x, y), log_dir=str(tmp_path), histograms=False, profile_images=True
    )
    model.fit(x, y, epochs=2, batch_size=8, callbacks=[callback], verbose=0)
    server = tensorboard_server(tmp_path)
    base = "/data/plugin/images"
    query = urllib.parse.urlencode(
        {"run": "actgrad", "tag": "actgrad/grad_norm_profile"}
    )
    images = server.wait_for_json(
        f"{base}/images?{query}", lambda images: len(images) >= 2, default=[]
    )
    assert [image["step"] for image in images] == [0, 1]
    # The image itself, as the Images tab fetches it: a PNG bar chart.
    png = server.get(f"{base}/individualImage?{images[-1]['query']}")
    height, width = image_module.imread(io.BytesIO(png)).shape[:2]
    assert width > 300 and height > 200
