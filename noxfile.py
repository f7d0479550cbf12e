"""The compatibility run: the oldest and the newest supported versions.

    pip install nox uv
    nox -s compat            # both; or nox -s "compat(versions='oldest')"

Each session installs keras-actgrad with one set of Keras and backend
versions into a fresh environment (with uv) and runs the tests marked
`compat` (the version-sensitive paths: in place, the monitor, mixed
precision, `steps_per_execution`, TensorBoard read-back), once per backend,
the three at once (`tests/run_all_backends.py -m compat`).

- "oldest": the minimum versions `pyproject.toml` declares, a set released
  together (Keras 3.11.0, TensorFlow 2.20.0, JAX 0.7.0, TensorBoard 2.20.0,
  in July-August 2025; NumPy 1.26.4, matplotlib 3.10.0), with every other
  package as it was then (`--exclude-newer`), and PyTorch 2.13.0, the
  oldest CPU build installable here.
- "newest": the newest releases, and flax (Keras's NNX mode on JAX).

The floors live in `pyproject.toml` and here; `tests/test_versions.py`
checks that they agree.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["compat"]

# The oldest supported versions: pyproject.toml's floors.
OLDEST = {
    "keras": "3.11.0",
    "tensorflow": "2.20.0",
    "jax": "0.7.0",
    "torch": "2.13.0",
    "tensorboard": "2.20.0",
    "numpy": "1.26.4",
    "matplotlib": "3.10.0",
}
# Every other package as it was when the oldest set was released.
OLDEST_DATE = "2025-08-31"
# The newest PyTorch installable here as a CPU build (newer ones pull
# multi-GB CUDA wheels).
TORCH = "2.13.0"
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.7.0"]


def _local_wheels() -> list[str]:
    # A machine-wide folder of prebuilt wheels (the CPU PyTorch build here).
    folder = "/opt/wheels"
    return ["--find-links", folder] if os.path.isdir(folder) else []


@nox.session(reuse_venv=True)
@nox.parametrize("versions", ["oldest", "newest"])
def compat(session: nox.Session, versions: str) -> None:
    """Installs one set of versions and runs the `compat` tests on every backend."""
    if versions == "oldest":
        pins = [
            f"{name}=={version}" if name != "jax" else f"jax[cpu]=={version}"
            for name, version in OLDEST.items()
        ]
        session.install(
            "--exclude-newer",
            OLDEST_DATE,
            *_local_wheels(),
            "-e",
            ".",
            *pins,
            *TEST_TOOLS,
        )
    else:
        session.install(
            *_local_wheels(),
            "-e",
            ".[tensorflow,jax,report]",
            f"torch=={TORCH}",
            "flax",
            "matplotlib",
            *TEST_TOOLS,
        )
    session.run(
        "python",
        "-c",
        "import keras, tensorflow, jax, torch; print('keras', keras.__version__, "
        "'tensorflow', tensorflow.__version__, 'jax', jax.__version__, "
        "'torch', torch.__version__)",
    )
    session.run(
        "python", "tests/run_all_backends.py", "-m", "compat", "-q", *session.posargs
    )
