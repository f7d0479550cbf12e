"""Several JAX processes (multi-host): the global batch's values, one writer.

Each run starts 2 or 4 processes of `_multihost_run.py` on this machine
(`jax.distributed` on a free port of 127.0.0.1, JAX's CPU collectives),
as a cluster would run the same script on each host, each process
training on its own share of every global batch. The reference is one
process on one device, here, trained on the global batches with the same
weights (`_multihost_common.reference`): every statistic, histogram,
weight-gradient and update norm, `activation_gradients` array and weight
after training must equal it, and be the same on every process.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="multi-process keras.distribution runs on JAX",
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
TOLERANCE = 1e-4
# A run that has not finished by then is killed (a hang fails the test).
HARD_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(count: int, devices: int, out: Any, scenario: str) -> list[Any]:
    """`count` processes of `scenario`; each one's stderr in `out`."""
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])
    )
    port = free_port()
    script = os.path.join(HERE, "_multihost_run.py")
    processes = []
    for i in range(count):
        with open(os.path.join(out, f"stderr-{i}.txt"), "w") as stderr:
            processes.append(
                subprocess.Popen(  # noqa: S603 - our own interpreter and script
                    [sys.executable, script, str(i), str(count), str(port)]
                    + [str(out), scenario],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
    return processes


def wait(runs: dict[str, list[Any]], timeout: float = HARD_TIMEOUT) -> dict[str, Any]:
    """Per run, each process's (exit code, when it ended); past `timeout`
    every process still running is killed (and the test fails)."""
    deadline = time.monotonic() + timeout
    ended: dict[int, tuple[int, float]] = {}
    everything = [p for processes in runs.values() for p in processes]
    try:
        while len(ended) < len(everything) and time.monotonic() < deadline:
            for process in everything:
                if id(process) not in ended and process.poll() is not None:
                    ended[id(process)] = (process.returncode, time.time())
            time.sleep(0.2)
    finally:
        for process in everything:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert len(ended) == len(everything), "a multi-process run hung"
    return {name: [ended[id(p)] for p in processes] for name, processes in runs.items()}


def stderr(out: Any, i: int) -> str:
    return str((out / f"stderr-{i}.txt").read_text(errors="replace"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Any]:
    """The 2- and 4-process runs and the failing one, started together, and
    the reference."""
    import _multihost_common as common

    root = tmp_path_factory.mktemp("multihost")
    outs = {name: root / name for name in ("two", "four", "raise")}
    for out in outs.values():
        out.mkdir()
    started = {
        "two": start(2, 2, outs["two"], "values"),
        "four": start(4, 1, outs["four"], "values"),
        "raise": start(2, 1, outs["raise"], "raise"),
    }
    try:
        reference = common.reference()
    finally:
        exited = wait(started)
    found: dict[str, Any] = {
        "reference": reference,
        "raise": {"out": outs["raise"], "exited": exited["raise"]},
    }
    for name in ("two", "four"):
        processes = started[name]
        for i, (code, _) in enumerate(exited[name]):
            assert code == 0, stderr(outs[name], i)[-4000:]
        count = len(processes)
        found[name] = {
            "out": outs[name],
            "values": [
                dict(np.load(outs[name] / f"values-{i}.npz")) for i in range(count)
            ],
            "reports": [
                json.loads((outs[name] / f"values-{i}.json").read_text())
                for i in range(count)
            ],
        }
    return found


def _compare(run: dict[str, Any], reference: dict[str, Any], name: str) -> int:
    first = run["values"][0]
    keys = [key for key in first if key.startswith(f"{name}/")]
    assert keys
    for values in run["values"][1:]:
        assert sorted(values) == sorted(first)
        for key in keys:  # the same on every process, bit for bit
            np.testing.assert_array_equal(values[key], first[key], err_msg=key)
    for key in keys:
        expected = reference["reference/" + key.split("/", 1)[1]]
        got = first[key]
        if key.endswith("/counts"):
            # Histogram counts: the same entries in the same bins, but for
            # an entry within float32 rounding of a bin edge.
            assert got.sum() == expected.sum(), key
            assert np.abs(got - expected).sum() <= 2, key
        else:
            error = _worst_error(got, expected)
            assert error < TOLERANCE, (key, error)
    return len(keys)


def _worst_error(got: Any, expected: Any) -> float:
    import _multihost_common as common

    return float(common.worst_error(got, expected))


@pytest.mark.parametrize(
    "run, name",
    [("two", "DataParallel"), ("two", "ModelParallel"), ("four", "ModelParallel")],
)
def test_values_equal_one_process(runs: dict[str, Any], run: str, name: str) -> None:
    found = runs[run]
    compared = _compare(found, runs["reference"], name)
    expected = runs["reference"]
    # Every kind of value was compared: the monitor's steps (with the spike
    # recorded in full), the callback's start, epoch and batch events,
    # activation_gradients, the trained weights.
    for part in (
        "monitor/actgrad/p1/grad_norm",
        "monitor/histograms/7/p2",
        "callback/start",
        "callback/batch",
        "share/p3/gradient",
        "weights/0",
    ):
        assert any(part in key for key in found["values"][0] if key.startswith(name)), (
            part
        )
    assert compared > 100
    steps = expected["reference/monitor/step"]
    assert list(steps) == list(range(1, 9))
    spikes = expected["reference/monitor/spike"]
    assert list(spikes) == [False] * 7 + [True]
    reports = found["reports"]
    assert all(
        report[name]["sharded"] == [name == "ModelParallel"] * 2 for report in reports
    )


def test_same_whole_batch_on_each_process_in_chunks(runs: dict[str, Any]) -> None:
    values = runs["two"]["values"][0]
    assert any(key.startswith("DataParallel/whole/") for key in values)
    assert any(key.startswith("DataParallel/chunked/") for key in values)


def test_one_writer_one_warning(runs: dict[str, Any]) -> None:
    for run, names in (
        ("two", ("DataParallel", "ModelParallel")),
        ("four", ("ModelParallel",)),
    ):
        found = runs[run]
        reports = found["reports"]
        for name in names:
            files = glob.glob(
                str(found["out"] / name / "**" / "*tfevents*"), recursive=True
            )
            writer = reports[0][name]["writer_pid"]
            # The monitor's and the callback's, both by process 0.
            assert len(files) == 2, files
            assert all(f".{writer}." in os.path.basename(f) for f in files), files
            spikes = [
                sum("Gradient spike" in w for w in report[name]["warnings"])
                for report in reports
            ]
            assert spikes == [1] + [0] * (len(reports) - 1)
            assert all(not report[name]["warnings"] for report in reports[1:]), reports[
                1
            ][name]["warnings"]


def test_mismatched_probe_batches_are_refused(runs: dict[str, Any]) -> None:
    for run, cases in (("two", ("sizes", "shapes")), ("four", ("replicas",))):
        reports = runs[run]["reports"]
        for case in cases:
            for i, report in enumerate(reports):
                refused = report["refusals"][case]
                assert refused is not None, (run, case, i)
                assert refused["trained"] == 0
                assert refused["message"].endswith(".")
                assert f"on process {i}" in refused["message"]
    message = runs["two"]["reports"][1]["refusals"]["sizes"]["message"]
    assert "examples per process [4, 5]" in message
    assert "Received:" in message
    message = runs["four"]["reports"][0]["refusals"]["replicas"]["message"]
    assert "processes [0, 1]" in message


def test_processes_without_one_distribution_are_refused(
    runs: dict[str, Any],
) -> None:
    for report in runs["two"]["reports"]:
        for message in report["undistributed"].values():
            assert message is not None
            assert "Received: 2 JAX processes and no `keras.distribution`" in message


def test_every_process_stops_together(runs: dict[str, Any]) -> None:
    reports = runs["two"]["reports"]
    # The NaN of step 3 is in the last process's share only: the global
    # gradient is non-finite on every process, which all stop there.
    assert [r["stop"]["steps"] for r in reports] == [[1, 2, 3]] * 2
    assert [r["stop"]["iterations"] for r in reports] == [3, 3]
    assert [r["stop"]["warnings"] for r in reports] == [1, 0]


def test_a_failing_process_does_not_hang_the_others(runs: dict[str, Any]) -> None:
    """Process 1 raises in a callback of its own and its script ends; process
    0 waits in the next step's collective. Process 1 waits at JAX's shutdown
    barrier (`shutdown_timeout_seconds`: 10 s here, 300 s by default), then
    JAX's coordination service ends both (within the fixture's hard timeout:
    a hang fails the test)."""
    found = runs["raise"]
    out = found["out"]
    (code0, ended0), (code1, ended1) = found["exited"]
    assert "RuntimeError: a callback of process 1 failed" in stderr(out, 1)
    # Both ended, with an error, soon after the shutdown timeout.
    assert code0 != 0 and code1 != 0, (code0, code1)
    assert "Barrier timed out" in stderr(out, 0) + stderr(out, 1)
    raised = json.loads((out / "raised.json").read_text())["time"]
    assert max(ended0, ended1) - raised < 90
