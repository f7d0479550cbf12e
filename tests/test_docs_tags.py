"""The tag reference (docs/reference/tags.md) against what a real run writes.

A short `fit` with `ActivationGradientCallback` and `GradientMonitor`, every
option that writes something turned on, logs to TensorBoard; its event
files are read back with TensorBoard's own reader. Every tag written must
match exactly one pattern of the page's table, of the kind (scalar,
histogram, ...) and step (epoch or global step) the table gives, and every
pattern must be written. The same for the `logs` keys against the page's
`logs` table. Patterns are parsed from the page, so a change of format
(in the code or the docs) that the other does not follow fails here.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_actgrad

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parent.parent
TAGS_PAGE = ROOT / "docs" / "reference" / "tags.md"
STATISTICS_PAGE = ROOT / "docs" / "guides" / "statistics.md"

# TensorBoard's plugin names for the page's "kind" column.
PLUGINS = {
    "scalar": "scalars",
    "histogram": "histograms",
    "text": "text",
    "image": "images",
    "Custom Scalars layout": "custom_scalars",
    "packed values": "actgrad",
}

EPOCHS, STEPS_PER_EPOCH = 2, 4


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after `heading`, as cells."""
    lines = text.split(heading, 1)[1].splitlines()
    table = []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    body = [line for line in table[1:] if not re.fullmatch(r"[|\s:-]+", line)]
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")] for line in body
    ]


def documented_statistics() -> list[str]:
    """The statistic names of the statistics page's table."""
    rows = table_rows(STATISTICS_PAGE.read_text(encoding="utf-8"), "# Statistics")
    return [
        match.group(1) for row in rows if (match := re.fullmatch(r"`(\w+)`", row[0]))
    ]


def pattern_regex(pattern: str, names: dict[str, list[str]]) -> re.Pattern[str]:
    """A regex for a documented pattern; `<name>` stands for any of names[name]."""
    parts = re.split(r"(<[^>]+>)", pattern)
    regex = ""
    for part in parts:
        if part.startswith("<"):
            choices = names[part[1:-1]]
            regex += "(?:" + "|".join(re.escape(choice) for choice in choices) + ")"
        else:
            regex += re.escape(part)
    return re.compile(regex)


def test_table_parser():
    text = "## A\n\n| tag | kind |\n|---|---|\n| `a.<x>/b` | scalar |\n\nafter\n"
    assert table_rows(text, "## A") == [["`a.<x>/b`", "scalar"]]
    assert pattern_regex("a.<x>/b", {"x": ["p/q", "r"]}).fullmatch("a.p/q/b")
    assert not pattern_regex("a.<x>/b", {"x": ["r"]}).fullmatch("a.s/b")
    assert "grad_norm" in documented_statistics()
    assert "nonfinite" in documented_statistics()


def _written(log_dir: str) -> dict[str, tuple[str, set[int]]]:
    """{tag: (plugin name, steps)} over the event files under `log_dir`."""
    from tensorboard.backend.event_processing import event_accumulator

    found: dict[str, tuple[str, set[int]]] = {}
    files = glob.glob(
        os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True
    )
    assert files, f"no event files under {log_dir}"
    for path in files:
        reader = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        reader.Reload()
        for tag in reader.Tags()["tensors"]:
            plugin = reader.SummaryMetadata(tag).plugin_data.plugin_name
            steps = {event.step for event in reader.Tensors(tag)}
            previous = found.get(tag, (plugin, set()))
            assert previous[0] == plugin, tag
            found[tag] = (plugin, previous[1] | steps)
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short fit with both callbacks writing everything they can."""
    pytest.importorskip("matplotlib")  # profile_images
    log_dir = str(tmp_path_factory.mktemp("tags"))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * STEPS_PER_EPOCH, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="logits"),
        ],
        name="tags_model",
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model = keras_actgrad.insert_probes(model)
    callback = keras_actgrad.ActivationGradientCallback(
        (x[:16], y[:16]),
        log_dir=log_dir,
        log_statistics=("grad_norm",),
        weight_gradients=True,
        probe_at_start=True,
        batch_freq=2,
        profile_images=True,
    )
    monitor = keras_actgrad.GradientMonitor(
        log_dir=log_dir, statistics=None, histograms_every_n_steps=2
    )
    history = model.fit(
        x, y, batch_size=16, epochs=EPOCHS, verbose=0, callbacks=[callback, monitor]
    )
    names = {
        "probe": callback.probe_order,
        "statistic": documented_statistics(),
        "variable path": [variable.path for variable in model.trainable_weights],
        "weight statistic": ["grad_norm", "update_norm", "update_ratio"],
    }
    return _written(log_dir), history.history, names


def test_tensorboard_tags_match_the_tag_reference(run):
    written, _, names = run
    rows = table_rows(TAGS_PAGE.read_text(encoding="utf-8"), "## TensorBoard tags")
    documented = []
    for row in rows:
        pattern = re.fullmatch(r"`([^`]+)`", row[0])
        assert pattern, f"tag reference row without a `pattern`: {row}"
        documented.append((pattern.group(1), row[1], row[2]))
    total_steps = EPOCHS * STEPS_PER_EPOCH
    matched: dict[str, list[str]] = {pattern: [] for pattern, _, _ in documented}
    for tag, (plugin, steps) in sorted(written.items()):
        matches = [
            (pattern, kind, step)
            for pattern, kind, step in documented
            if pattern_regex(pattern, names).fullmatch(tag)
        ]
        assert len(matches) == 1, f"tag {tag!r} matches {len(matches)} documented rows"
        pattern, kind, step = matches[0]
        matched[pattern].append(tag)
        assert PLUGINS[kind] == plugin, (tag, kind, plugin)
        if step == "epoch":
            assert steps <= set(range(EPOCHS)), (tag, steps)
        elif step == "global step":
            assert steps <= set(range(total_steps + 1)), (tag, steps)
    unwritten = [pattern for pattern, tags in matched.items() if not tags]
    assert unwritten == [], f"documented tags that a run does not write: {unwritten}"


def test_logs_keys_match_the_tag_reference(run):
    _, history, names = run
    rows = table_rows(TAGS_PAGE.read_text(encoding="utf-8"), "## `logs` keys")
    patterns = [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in rows]
    keys = [key for key in history if key.startswith("actgrad")]
    matched = {pattern: [] for pattern in patterns}
    for key in keys:
        found = [p for p in patterns if pattern_regex(p, names).fullmatch(key)]
        assert len(found) == 1, f"logs key {key!r} matches {found}"
        matched[found[0]].append(key)
        # Every epoch has a value (one row per epoch for CSVLogger).
        assert len(history[key]) == EPOCHS and not np.isnan(history[key]).any(), key
    assert [p for p, found in matched.items() if not found] == []
