"""tf.distribute: a model built under MirroredStrategy probes like one device.

The strategy needs two logical CPU devices, configured before TensorFlow
initialises its devices: `_mirrored_run.py` does it in a fresh process and
reports its comparisons as JSON; the references there are hand-split tapes
on a single-device copy with the same weights.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies exist on the TensorFlow backend only",
)

HERE = os.path.dirname(os.path.abspath(__file__))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def result(process):
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the mirrored run and the two workers at once; waits for all."""
    root = tmp_path_factory.mktemp("multiworker")
    ports = ",".join(map(str, free_ports(2)))
    processes = {
        "mirrored": start("_mirrored_run.py"),
        "chief": start("_multiworker_run.py", 0, ports, root / "chief"),
        "worker": start("_multiworker_run.py", 1, ports, root / "worker"),
    }
    return {name: result(process) for name, process in processes.items()}


@pytest.fixture(scope="module")
def mirrored(runs):
    return runs["mirrored"]


def test_no_warnings_of_ours(runs):
    for name, report in runs.items():
        assert report["our_warnings"] == [], name


def test_model_is_really_mirrored(mirrored):
    assert mirrored["replicas"] == 2
    assert mirrored["mirrored"] == "MirroredVariable"


def test_activation_gradients_match_one_device(mirrored):
    # The probe batch (21 examples, not divisible by 2) runs whole, outside
    # the replicas: the values are those of one device.
    assert mirrored["reference_max"] > 1e-3
    assert mirrored["outside_error"] <= 1e-6 * mirrored["reference_max"] + 1e-8


def test_activation_gradients_inside_strategy_scope(mirrored):
    # Inside `strategy.scope()` Keras divides mean losses by the number of
    # replicas; the probe pass must not (the gradients would be halved).
    assert mirrored["inside_error"] <= 1e-6 * mirrored["reference_max"] + 1e-8


def test_inside_strategy_run_is_a_clear_error(mirrored):
    message = mirrored["replica_context_error"]
    assert message is not None
    assert "replica context" in message and "Received:" in message


def test_callback_during_mirrored_fit(mirrored):
    assert mirrored["trained"]
    for name, (logged, reference) in mirrored["callback"].items():
        assert reference > 0, name
        assert logged == pytest.approx(reference, rel=1e-5), name
    assert len(mirrored["event_files"]) == 1


def test_multiworker_only_the_chief_writes_summaries(runs):
    chief, worker = runs["chief"], runs["worker"]
    assert chief["replicas"] == worker["replicas"] == 2
    assert chief["should_save_summary"] and not worker["should_save_summary"]
    assert chief["wrote"] and not worker["wrote"]
    # Every worker probes locally and fills `logs` with the same values, so
    # decisions taken on them (EarlyStopping, on_nonfinite="stop") agree.
    assert chief["events"] == worker["events"] == 1
    assert chief["grad_norm"] == worker["grad_norm"]
    assert chief["grad_norm"] == pytest.approx(chief["reference_grad_norm"], rel=1e-5)


def test_multiworker_monitor_is_refused(runs):
    for name in ("chief", "worker"):
        message = runs[name]["monitor_error"]
        assert message is not None, name
        assert "MirroredStrategy" in message and "Received: " in message
        assert "with 2 replicas" in message
