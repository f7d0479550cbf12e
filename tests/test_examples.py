"""Every example runs (small settings) and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import keras_actgrad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_on(backend):
    """Each example (a fresh process, minutes) runs in one backend's suite;
    the library under it is tested on every backend elsewhere."""
    return pytest.mark.one_backend(backend, reason="an example script's run")


def run_example(name, cwd, *args):
    env = dict(
        os.environ,
        ACTGRAD_EXAMPLE_QUICK="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stdout


def table_rows(text, title_start):
    """{probe: cells} of the report table whose title line starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    rows = {}
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


@example_on("jax")
def test_quickstart(tmp_path):
    out = run_example("quickstart", tmp_path, "--png", "heat.png")
    rows = table_rows(out, "grad_norm per probe")
    assert list(rows) == [
        "dense_probe",
        "dense_1_probe",
        "dense_2_probe",
        "dense_3_probe",
    ]
    assert all(cells[-1] == "-" for cells in rows.values())  # a healthy MLP
    log_dir = os.path.join("logs", "quickstart")
    assert f"tensorboard --logdir {log_dir}" in out
    assert f"keras-actgrad report {log_dir}" in out
    assert os.path.getsize(tmp_path / "heat.png") > 10_000
    # Keras's TensorBoard callback wrote beside the callback's actgrad/.
    assert {"actgrad", "train"} <= set(os.listdir(tmp_path / log_dir))
    report = keras_actgrad.load_report(str(tmp_path / log_dir))
    assert report.epochs == [0, 1, 2]
    # The value the callback put in `logs` (first probe's grad_norm over the
    # last probe's) matches the last epoch's values read back from the
    # TensorBoard event files.
    logged = re.search(r"grad_norm_ratio'\] at the last epoch: (\S+)", out).group(1)
    norms = report.matrix("grad_norm")[:, -1]
    assert float(logged) == pytest.approx(norms[0] / norms[-1], rel=1e-3)


@example_on("torch")
def test_vanishing_gradients(tmp_path):
    out = run_example("vanishing_gradients", tmp_path)
    sigmoid, relu = out.split("== deep_relu_batchnorm")
    assert "== deep_sigmoid: 10 hidden layers" in sigmoid
    assert "vanishing alert: " in sigmoid and "hidden1_probe" in sigmoid
    assert "no vanishing alert" in relu
    rows = table_rows(sigmoid, "grad_norm per probe")
    assert list(rows) == [f"hidden{i}_probe" for i in range(1, 11)] + ["logits_probe"]
    assert rows["hidden1_probe"][-1].startswith("vanishing (epoch 0)")
    first, last = float(rows["hidden1_probe"][0]), float(rows["logits_probe"][0])
    assert first / last < 1e-4
    relu_rows = table_rows(relu, "grad_norm per probe")
    assert all(cells[-1] == "-" for cells in relu_rows.values())
    first, last = (
        float(relu_rows["hidden1_probe"][0]),
        float(relu_rows["logits_probe"][0]),
    )
    assert first / last > 1e-2


@example_on("tensorflow")
def test_functional_resnet(tmp_path):
    out = run_example("functional_resnet", tmp_path)
    probes = ["stem_probe"] + [
        f"block{b}_{layer}_probe" for b in (1, 2) for layer in ("conv1", "conv2", "add")
    ]
    assert f"7 probes: {', '.join(probes)}" in out
    assert list(table_rows(out, "grad_norm per probe")) == probes


@example_on("torch")
def test_subclassed_model(tmp_path):
    out = run_example("subclassed_model", tmp_path)
    assert list(table_rows(out, "grad_norm per probe")) == [
        "pixels",
        "hidden1",
        "hidden2",
    ]
    lines = out.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("saliency for class 3")
    )
    saliency_rows = lines[start + 1 : start + 9]
    assert all(len(row) == 2 + 16 + 4 + 16 for row in saliency_rows)
    assert "@" in "".join(saliency_rows)  # the maximum is drawn
    pixels = re.search(r"most salient pixels \(row, column\): (.*)", out).group(1)
    assert len(re.findall(r"\(\d, \d\)", pixels)) == 3


def test_every_example_has_a_test():
    names = sorted(
        name[:-3]
        for name in os.listdir(os.path.join(ROOT, "examples"))
        if name.endswith(".py")
    )
    source = open(__file__).read()
    assert [name for name in names if f"def test_{name}(" not in source] == []


@example_on("tensorflow")
def test_kerashub_transformer(tmp_path):
    import pytest

    pytest.importorskip("keras_hub")
    out = run_example("kerashub_transformer", tmp_path)
    rows = table_rows(out, "grad_norm per probe")
    blocks = [f"transformer_layer_{i}" for i in range(2)]
    assert set(blocks) <= set(rows)
    assert {f"{b}/self_attention" for b in blocks} <= set(rows)
    assert {f"{b}/feedforward_output_dense" for b in blocks} <= set(rows)
    assert all(float(cells[0]) > 0 for cells in rows.values())
    assert "still a GPT2CausalLM" in out


@example_on("tensorflow")
def test_gan_vanishing_gradients(tmp_path):
    out = run_example("gan_vanishing_gradients", tmp_path, "--png", "gan.png")
    saturating, non_saturating = out.split("== non-saturating")
    for run in (saturating, non_saturating):
        assert (
            "passes measured: d_optimizer/disc_probe, g_optimizer/gen_probe, "
            "g_optimizer/disc_probe" in run
        )

    def epochs(text):
        rows = re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.e+-]+)$", text, re.MULTILINE)
        return [(float(d), float(norm)) for d, norm in rows]

    sat, non_sat = epochs(saturating), epochs(non_saturating)
    assert len(sat) == len(non_sat) == 4
    # The discriminator wins: D(G(z)) near 0, and the saturating
    # generator's gradient shrinks with it, 5-fold and more ...
    assert all(d < 0.05 for d, _ in sat)
    assert sat[-1][1] < sat[0][1] / 5
    # ... while the non-saturating one's does not vanish.
    assert all(norm > 0.03 for _, norm in non_sat)
    assert sat[-1][1] < non_sat[-1][1] / 10
    assert (tmp_path / "gan.png").stat().st_size > 0
