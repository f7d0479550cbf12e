"""tf.distribute: a model built under MirroredStrategy probes like one device.

The strategy needs two logical CPU devices, configured before TensorFlow
initialises its devices: `_mirrored_run.py` does it in a fresh process and
reports its comparisons as JSON; the references there are hand-split tapes
on a single-device copy with the same weights.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies exist on the TensorFlow backend only",
)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mirrored():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    completed = subprocess.run(
        [sys.executable, os.path.join(HERE, "_mirrored_run.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


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


def test_callback_during_mirrored_fit(mirrored):
    assert mirrored["trained"]
    for name, (logged, reference) in mirrored["callback"].items():
        assert reference > 0, name
        assert logged == pytest.approx(reference, rel=1e-5), name
    assert len(mirrored["event_files"]) == 1
