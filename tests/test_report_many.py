"""The report at 200 probes: legible table and heatmap, `--select`, notebooks.

Events are written with the callback's own `EventWriter` (the tags the
callback writes today), for 200 probes in 50 blocks of 4, as a KerasHub
model measured in place names them; values are a closed form of the probe
index and epoch, so every number is known.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_actgrad  # noqa: E402
from keras_actgrad.__main__ import main  # noqa: E402

PARTS = ("self_attention/query", "self_attention/value", "mlp/up", "mlp/down")
PROBES = [f"transformer_layer_{b}/{part}" for b in range(50) for part in PARTS]
EPOCHS = 3
VANISHING = 1e-3


def grad_norm(i, epoch):
    # Falls by 10x every 20 probes towards the input: probes 0-138 are below
    # 1e-3 times the last probe's (more than 60 probes before it).
    return 10.0 ** (-(len(PROBES) - 1 - i) / 20) * (1 + epoch)


def write_events(log_dir, probes=PROBES, blocks=True):
    from keras_actgrad._statistics.statistics import Reduced
    from keras_actgrad._tensorboard import EventWriter

    writer = EventWriter(str(log_dir), thresholds={"vanishing": VANISHING})
    for epoch in range(EPOCHS):
        rows = {
            probe: {"grad_norm": grad_norm(i, epoch), "nonfinite": 0.0}
            for i, probe in enumerate(probes)
        }
        reduced = Reduced(statistics=rows, histograms={}, weight_grad_norms={})
        assert writer.write("epoch", epoch, reduced, ["grad_norm", "nonfinite"], probes)
    writer.close()


def vanishing_probes(probes=PROBES):
    last = grad_norm(len(PROBES) - 1, 0)
    return [p for p in probes if grad_norm(PROBES.index(p), 0) / last < VANISHING]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("many")
    write_events(path)
    return path


def test_table_of_200_probes(log_dir, capsys):
    assert main(["report", str(log_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[3:]
    assert [line.split()[0] for line in body] == PROBES
    flagged = [line.split()[0] for line in body if "vanishing" in line]
    assert flagged == vanishing_probes() and len(flagged) == 139


def test_select_glob(log_dir, capsys):
    args = ["report", str(log_dir), "--select", "transformer_layer_1/*"]
    assert main(args) == 0
    body = capsys.readouterr().out.splitlines()[3:]
    assert [line.split()[0] for line in body] == [
        f"transformer_layer_1/{part}" for part in PARTS
    ]
    # Several patterns; the alerts still compare with the run's last probe.
    args = ["report", str(log_dir), "--select", "*/mlp/down", "--select", "*_0/*"]
    assert main(args) == 0
    body = capsys.readouterr().out.splitlines()[3:]
    names = [line.split()[0] for line in body]
    assert names == [p for p in PROBES if p.endswith("/mlp/down") or "_0/" in p]
    assert [n for n in names if "vanishing" in body[names.index(n)]] == (
        vanishing_probes(names)
    )
    assert main(["report", str(log_dir), "--select", "nothing*"]) == 2
    assert "No probe matches ['nothing*']" in capsys.readouterr().err


def test_heatmap_of_200_probes_stays_legible(log_dir, tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from PIL import Image

    seen = {}
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        ax = self.axes[0]
        seen["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["size"] = self.get_size_inches()
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    path = tmp_path / "many.png"
    keras_actgrad.load_report(str(log_dir)).plot(str(path))
    # One label per block (50 of them, 4 probes each), not 200.
    assert seen["labels"] == [f"transformer_layer_{b} (4)" for b in range(50)]
    assert seen["size"][1] <= 22
    assert seen["legend"] == ["probe with an alert (139)"]
    width, height = Image.open(path).size
    assert height <= 2200 and width <= 1800


def test_heatmap_without_blocks_labels_every_kth(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    probes = [f"dense_{i}_probe" for i in range(len(PROBES))]
    write_events(tmp_path, probes)
    seen = {}
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        seen["ticks"] = list(self.axes[0].get_yticks())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    keras_actgrad.load_report(str(tmp_path)).plot(str(tmp_path / "k.png"))
    every = seen["ticks"][1] - seen["ticks"][0]
    assert every > 1 and len(seen["ticks"]) == math.ceil(len(probes) / every)
    assert len(seen["ticks"]) <= 110  # at least 10 points apart on 22 inches


def test_report_shows_itself_in_a_notebook(log_dir):
    report = keras_actgrad.load_report(str(log_dir))
    png = report._repr_png_()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = report._repr_html_()
    assert page.count("<img") == 1 and "data:image/png;base64," in page
    assert "<details><summary>table (200 probes)</summary>" in page
    assert "transformer_layer_49/mlp/down" in page
    small = report.select("transformer_layer_49/*")
    assert "<details>" not in small._repr_html_()
    assert np.isfinite(small.matrix()).all()
