"""Shared pytest configuration.

The suite runs once per Keras backend (`KERAS_BACKEND=tensorflow|jax|torch`,
see `tests/run_all_backends.py`). A test whose reference or subject only
exists on TensorFlow (a hand-split `tf.GradientTape`, `tf.distribute`) is
marked `@pytest.mark.requires_tensorflow(reason=...)` and skipped on the
other backends with that reason.

A test whose subject does not depend on the backend (a `tensorboard`
server reading event files, an example script's output) but which costs
minutes is marked `@pytest.mark.one_backend("jax", reason=...)`: it runs
in that backend's suite only, so the whole suite stays within CI's time.
Spread such tests over the backends, so that each still runs some.

The `tensorboard_server` fixture starts a real `tensorboard` server on a log
directory, for tests that check what TensorBoard's own UI would show.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_tensorflow(reason): the test needs the TensorFlow backend; "
        "skipped with `reason` on the others",
    )
    config.addinivalue_line(
        "markers",
        "one_backend(backend, reason): a costly test that does not depend on "
        "the backend; runs in `backend`'s suite only",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    backend = keras.backend.backend()
    for item in items:
        once = item.get_closest_marker("one_backend")
        if once is not None and once.args[0] != backend:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"runs once, in the {once.args[0]} suite "
                    f"({once.kwargs.get('reason', 'the backend does not matter')})"
                )
            )
    if backend == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("requires_tensorflow")
        if marker is None:
            continue
        reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
        item.add_marker(
            pytest.mark.skip(
                reason=f"TensorFlow only ({reason})" if reason else "TensorFlow only"
            )
        )


class TensorBoardServer:
    """A `tensorboard` process serving one log directory on 127.0.0.1."""

    def __init__(self, log_dir: str | Path, env: dict[str, str] | None = None) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(log_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--load_fast",
                "false",
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def get(self, path: str) -> bytes:
        """The body of `GET http://127.0.0.1:<port><path>`."""
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return bytes(response.read())

    def wait_for_json(
        self, path: str, done: Callable[[Any], bool], default: Any, timeout: float = 240
    ) -> Any:
        """Polls the JSON at `path` until `done(value)` or `timeout` seconds.

        Returns the last value read (`default` while the server does not
        answer); fails the test if the server exits.
        """
        deadline = time.monotonic() + timeout
        value = default
        while time.monotonic() < deadline:
            try:
                value = json.loads(self.get(path))
            except OSError:
                value = default
            if done(value):
                break
            if self.process.poll() is not None:
                pytest.fail(f"tensorboard exited with code {self.process.returncode}")
            time.sleep(0.5)
        return value

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def tensorboard_server() -> Iterator[Callable[..., TensorBoardServer]]:
    """Starts `tensorboard` servers on log directories; stops them after the test.

    `start(log_dir, env=None)`: `env` is the server process's environment
    (default: this process's).
    """
    servers: list[TensorBoardServer] = []

    def start(
        log_dir: str | Path, env: dict[str, str] | None = None
    ) -> TensorBoardServer:
        servers.append(TensorBoardServer(log_dir, env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
