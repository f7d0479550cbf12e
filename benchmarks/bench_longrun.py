"""Benchmark: `GradientMonitor` over long runs (host memory, log size, reading).

The model of the long-run targets: an MLP of 50 `Dense(32)` ReLU layers
with a `GradientProbe` after each and a bias-free `Dense(1)` head (101
trainable variables), batch 8, SGD,
`GradientMonitor(log_dir=...)` at its defaults (every step, `grad_norm`,
weight gradients, `max_events=1000`).

1. **Host memory.** `fit` for `--steps` steps (default 3000) with the
   monitor; the process's RSS is read every 250 steps by a callback. The
   growth per 1000 steps is the slope of a least-squares line through the
   readings after step `max_events` + 500 (the in-memory history is full
   by then). The same with `max_events=None` (every event kept), for
   comparison.
2. **Bytes per step.** The size of `<log_dir>/actgrad/` over the monitored
   steps, and the marginal size (between the readings above).
3. **A 100k-step log.** Written by the script directly with the monitor's
   own writer (`EventWriter.write`, the columns and values of the trained
   monitor's last event, perturbed per step), not by training 100k steps.
   Timed, each in a fresh process: `keras-actgrad report LOGDIR` (the
   command, start-up included); `load_report(LOGDIR)` and
   `GradientMonitor`-style `to_numpy` reading of the whole run; and the
   dashboard: a `tensorboard --logdir LOGDIR` server started, then its
   `actgrad` heatmap route polled until it serves the run's last step
   (`--load_fast=true`, TensorBoard's Rust data server, its default where
   installed; with `--python-loader` also `--load_fast=false`, its Python
   loader). Wall seconds, and CPU seconds of the processes (the machine is
   shared: the load average is printed with them); the same on a 10-step
   log gives TensorBoard's own start-up.
4. **Start-up.** `keras-actgrad report` on a small log: wall time, and
   whether TensorFlow or Keras was imported.

Targets (issues 26, 29): RSS flat in the steps; <= 8 KB per step; report and
dashboard open the 100k-step run in <= 10 s; the report starts in <= 2 s.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_longrun.py            # full
    KERAS_BACKEND=jax python benchmarks/bench_longrun.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_actgrad  # noqa: E402

DEPTH, WIDTH, BATCH = 50, 32, 8


def rss_mb() -> float:
    with open("/proc/self/statm") as file:
        pages = int(file.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    h = inputs
    for i in range(DEPTH):
        h = keras.layers.Dense(
            WIDTH, activation="relu", kernel_initializer="he_normal", name=f"dense_{i}"
        )(h)
        h = keras_actgrad.GradientProbe(name=f"probe_{i}")(h)
    outputs = keras.layers.Dense(1, use_bias=False, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    return model


def directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


class Readings(keras.callbacks.Callback):
    def __init__(self, log_dir: str, every: int = 250) -> None:
        super().__init__()
        self.log_dir, self.every = log_dir, every
        self.rows: list[tuple[int, float, int]] = []
        self.step = 0

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.step += 1
        if self.step % self.every == 0:
            size = directory_bytes(self.log_dir) if os.path.isdir(self.log_dir) else 0
            self.rows.append((self.step, rss_mb(), size))


def long_fit(steps: int, max_events: int | None, log_dir: str) -> dict[str, object]:
    model = mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, WIDTH)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 1)).astype("float32")
    monitor = keras_actgrad.GradientMonitor(log_dir=log_dir, max_events=max_events)
    readings = Readings(log_dir)
    start = time.perf_counter()
    model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor, readings]
    )
    seconds = time.perf_counter() - start
    after = (max_events or 0) + 500
    rows = [row for row in readings.rows if row[0] >= after] or readings.rows
    steps_read = np.array([row[0] for row in rows], float)
    slope = (
        np.polyfit(steps_read, [row[1] for row in rows], 1)[0] * 1000
        if len(rows) > 1
        else float("nan")
    )
    total = directory_bytes(log_dir)
    marginal = (
        (rows[-1][2] - rows[0][2]) / (rows[-1][0] - rows[0][0])
        if len(rows) > 1
        else float("nan")
    )
    return {
        "monitor": monitor,
        "model": model,
        "seconds": seconds,
        "rss_mb_per_1000_steps": slope,
        "rss_mb": [(s, round(r, 1)) for s, r, _ in readings.rows],
        "bytes_per_step": total / steps,
        "marginal_bytes_per_step": marginal,
        "events_kept": len(monitor.events),
    }


def write_synthetic(monitor: keras_actgrad.GradientMonitor, log_dir: str, steps: int):
    """`steps` step events written with the monitor's own writer and layout."""
    from keras_actgrad._monitor import STATISTICS  # noqa: F401 - same package
    from keras_actgrad._statistics.statistics import Reduced
    from keras_actgrad._tags import global_summary_tag
    from keras_actgrad._tensorboard import EventWriter

    event = monitor.events[-1]
    names = list(monitor.statistics)
    columns, values = monitor._packed(event, names)
    values = np.asarray(values, np.float64)
    order = monitor.probe_order
    writer = EventWriter(log_dir, thresholds={"vanishing": 1e-4, "exploding": 1e4})
    rng = np.random.default_rng(1)
    grad_norm = columns.index(f"actgrad/{order[0]}/grad_norm")
    for step in range(1, steps + 1):
        row = values * rng.uniform(0.5, 1.5, size=values.shape)
        row[0] = step // 1000  # the epoch
        statistics = {
            probe: {"grad_norm": float(row[grad_norm + i])}
            for i, probe in enumerate(order)
        }
        writer.write(
            "step",
            step,
            Reduced(statistics, {}, {}),
            names,
            order,
            {global_summary_tag("step"): float(row[1])},
            (columns, row),
        )
    writer.close()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(code: str, cpu: dict[str, float] | None = None) -> tuple[float, str]:
    """Wall seconds of `python -c code` (its CPU seconds into `cpu["cpu"]`)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    before = children_cpu()
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu["cpu"] = children_cpu() - before
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return seconds, result.stdout + result.stderr


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process `pid` and its descendants."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as file:
                total += sum(tree_cpu(int(child)) for child in file.read().split())
    except OSError:
        pass
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dashboard_seconds(
    log_dir: str, last_step: int, load_fast: str
) -> tuple[float, float]:
    """From starting `tensorboard` to the heatmap route serving `last_step`:
    wall seconds, and CPU seconds of the server and its data server."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir]
        + ["--host", "127.0.0.1", "--port", str(port), "--load_fast", load_fast],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    query = urllib.parse.urlencode(
        {"run": "actgrad", "kind": "step", "statistic": "grad_norm"}
    )
    url = f"http://127.0.0.1:{port}/data/plugin/actgrad/heatmap?{query}"
    try:
        while time.perf_counter() - start < 300:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    data = json.loads(response.read())
                if data["steps"] and data["steps"][-1] == last_step:
                    return time.perf_counter() - start, tree_cpu(server.pid)
            except OSError:
                pass
            time.sleep(0.2)
        return float("nan"), tree_cpu(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--long", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--long-only",
        action="store_true",
        help="skip the memory runs (a 20-step fit gives the log's layout)",
    )
    parser.add_argument("--python-loader", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.long = 1500, 5000
    work = tempfile.mkdtemp(prefix="bench_longrun_")
    results: dict[str, object] = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
    }
    try:
        configurations = [("max_events=1000", 1000), ("max_events=None", None)]
        if args.long_only:
            args.steps, configurations = 20, configurations[:1]
        for name, max_events in configurations:
            run = long_fit(args.steps, max_events, os.path.join(work, name))
            monitor = run.pop("monitor")
            run.pop("model")
            results[name] = run
            print(name, json.dumps(run), flush=True)
        long_dir = os.path.join(work, "long")
        start = time.perf_counter()
        write_synthetic(monitor, long_dir, args.long)
        results["long_write_seconds"] = time.perf_counter() - start
        results["long_bytes_per_step"] = directory_bytes(long_dir) / args.long
        print("written", args.long, "steps", flush=True)
        cpu: dict[str, float] = {}
        results["loadavg_before_reading"] = os.getloadavg()
        report, output = timed(
            "import sys; from keras_actgrad.__main__ import main; "
            f"sys.argv = ['keras-actgrad', 'report', {long_dir!r}]; sys.exit(main())",
            cpu,
        )
        results["report_command_seconds"] = report
        results["report_command_cpu_seconds"] = cpu["cpu"]
        results["report_output_head"] = output.splitlines()[:3]
        results["load_report_seconds"], _ = timed(
            "import time; t = time.perf_counter(); import keras_actgrad; "
            f"r = keras_actgrad.load_report({long_dir!r}); "
            "print(len(r.epochs)); r.table(); r.alerts()",
            cpu,
        )
        results["load_report_cpu_seconds"] = cpu["cpu"]
        results["to_numpy_seconds"], _ = timed(
            "from keras_actgrad._eventfile import event_files, read_file, table; "
            f"files = event_files({os.path.join(long_dir, 'actgrad')!r}); "
            "steps, columns, _ = table([read_file(f) for f in files]); "
            "print(len(steps), len(columns))",
            cpu,
        )
        results["to_numpy_cpu_seconds"] = cpu["cpu"]
        loaders = ("true", "false") if args.python_loader else ("true",)
        for load_fast in loaders:
            wall, used = dashboard_seconds(long_dir, args.long, load_fast)
            results[f"dashboard_seconds_load_fast_{load_fast}"] = wall
            results[f"dashboard_cpu_seconds_load_fast_{load_fast}"] = used
        # TensorBoard's own start-up: the same on a 10-step log.
        tiny_dir = os.path.join(work, "tiny")
        write_synthetic(monitor, tiny_dir, 10)
        wall, used = dashboard_seconds(tiny_dir, 10, "true")
        results["dashboard_seconds_10_steps"] = wall
        results["dashboard_cpu_seconds_10_steps"] = used
        results["loadavg_after_reading"] = os.getloadavg()
        small = os.path.join(work, "max_events=1000")
        code = (
            "import sys; from keras_actgrad.__main__ import main; "
            f"sys.argv = ['keras-actgrad', 'report', {small!r}]; main(); "
            "print('imported:', sorted({m.split('.')[0] for m in sys.modules} "
            "& {'tensorflow', 'keras', 'jax', 'torch'}))"
        )
        results["report_startup_seconds"] = min(timed(code)[0] for _ in range(3))
        results["report_startup_imports"] = timed(code)[1].splitlines()[-1]
        results["cli_seconds"] = min(timed_cli(small) for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str))


def timed_cli(log_dir: str) -> float:
    """`keras-actgrad report` as installed (the console script), if it is."""
    script = shutil.which("keras-actgrad") or os.path.join(
        os.path.dirname(sys.executable), "keras-actgrad"
    )
    if not os.path.exists(script):
        return float("nan")
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    subprocess.run(
        [script, "report", log_dir], capture_output=True, env=env, check=True
    )
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
