"""Shared, session-scoped fixtures: the embedded model is built once, the default sweep runs once.

End-to-end tests run the real CLI (`python run.py -m ...`) in a subprocess, against a real SQLite MLflow
store in a temporary folder, and assert on what the store holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


def _share_cores_between_workers() -> None:
    """Give each pytest-xdist worker, and every process it starts, an equal share of the cores as OpenMP threads.

    torch (and MKL) otherwise take every core in each process, so two workers on two cores run four spinning
    threads: small matmuls then take several times as long as with one thread each
    (`python benchmarks/oversubscription.py` prints the ratio). A value set by hand wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


_share_cores_between_workers()  # before torch is imported, here or in a child

from quantbench.children import free_port  # noqa: E402
from quantbench import schema  # noqa: E402
from quantbench.ops import server  # noqa: E402
from quantbench.paths import ROOT, cache_root  # noqa: E402 (the one place that knows where things are)

pytest_plugins = ["helpers.sigterm", "helpers.hub"]  # hub: the local hub fixtures (local_hub, stopped_hub)

CACHE = cache_root()
schema.register()  # tests that compose the config with Hydra need the groups' schemas, as run.py does


@dataclass
class Store:
    """A finished CLI invocation and the MLflow store it wrote to."""

    uri: str
    artifacts: Path
    result: subprocess.CompletedProcess

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def runs(self, experiment: str = "quantbench-tiny"):
        exp = self.client.get_experiment_by_name(experiment)
        assert exp is not None, f"no experiment {experiment!r}; CLI output:\n{self.result.stdout[-3000:]}"
        return self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def run_cli(
    *overrides: str,
    mlruns: Path,
    workdir: Path,
    timeout: int = 1800,
    check: bool = True,
    env: dict[str, str | None] | None = None,
) -> Store:
    """`python run.py <overrides>` with its store, outputs and sweep folders redirected into `mlruns`/`workdir`
    (a test's own `overrides` of them win). The job's environment is this one's with the hub offline, plus `env`
    (e.g. a local hub's, `LocalHub.env`, which turns offline mode off); a key given as None is removed."""
    # flags (-m, --config-dir=DIR: a flag's value after '=') go before the overrides; argparse takes none after them
    flags = [o for o in overrides if o.startswith("-")]
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *flags,
        f"paths.mlruns={mlruns}",
        f"hydra.sweep.dir={workdir}/multirun",
        f"hydra.run.dir={workdir}/outputs",
        f"quantized_cache.dir={workdir}/quantized",  # per test: a test that quantizes really quantizes
        *(o for o in overrides if not o.startswith("-")),
    ]
    env = {
        **os.environ,
        "QUANTBENCH_CACHE": str(CACHE),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    env = {k: v for k, v in env.items() if v is not None}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)
    result.stdout = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-6000:]}")
    return Store(uri=f"sqlite:///{mlruns}/mlflow.db", artifacts=mlruns / "artifacts", result=result)


# The files that take longest on a 2-core machine (`make test`'s --durations), longest first: the workers start on
# them and the many short files fill in at the end, instead of a long file starting last while the other worker
# idles (pytest-xdist's own order is by test count, which put the seed study's five tests near the end). The default
# sweep's file comes first, so that the session's one default sweep (a file lock: the first worker to ask runs it)
# has finished before the other worker, busy with the seed study, reaches a file that reads it.
LONGEST_FILES = (
    "tests/e2e/test_default_sweep.py",
    "tests/e2e/test_seed_study.py",
    "tests/e2e/test_search_study.py",
    "tests/job/test_quantized_cache.py",
    "tests/test_resume.py",
    "tests/faults/test_shared_state_faults.py",
    "tests/job/bench/backends/test_vllm.py",
    "tests/e2e/test_serving_sweep.py",
    "tests/job/methods/test_preset.py",
    "tests/e2e/test_launchers.py",
    "tests/faults/test_process_faults.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup` (`make test`), each file is one group, so a worker runs all of a file's
    tests and its module fixtures run once; LONGEST_FILES go first."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    """pytest-xdist's controller hands out the groups in the workers' collection order (LONGEST_FILES first), not
    sorted by test count. Under pytest-xdist on a machine of several GPUs (`pytest -m gpu -n 2`), each worker takes one
    GPU, round robin, before anything initialises CUDA: the GPU tests then run side by side instead of sharing GPU 0."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not shutil.which("nvidia-smi"):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        visible = ",".join(str(i) for i in range(sum(row.startswith("GPU ") for row in listing.splitlines())))
    gpus = [g for g in visible.split(",") if g.strip()]
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[int(worker[2:]) % len(gpus)]


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    """The embedded model and its tasks, built (or taken from the cache) once per session."""
    from quantbench.embedded import tiny

    return tiny.build(cache_dir=CACHE / "quantbench")


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' common temporary parent), or this
    session's own where there are no workers."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def default_sweep(tiny_root, tmp_path_factory) -> Store:
    """The README's default sweep (`python run.py -m`): every default method on the embedded model, run once per
    session: the first worker to ask runs it, under a file lock, and the others read its store."""
    from filelock import FileLock

    work = shared_folder(tmp_path_factory, "default_sweep")
    output = work / "cli-output.json"
    with FileLock(f"{work}.lock"):
        if not output.exists():
            work.mkdir(parents=True, exist_ok=True)
            store = run_cli("-m", mlruns=work / "mlruns", workdir=work)
            output.write_text(json.dumps({"args": store.result.args, "stdout": store.result.stdout}))
    done = json.loads(output.read_text())
    result = subprocess.CompletedProcess(done["args"], 0, done["stdout"], "")
    return Store(uri=f"sqlite:///{work}/mlruns/mlflow.db", artifacts=work / "mlruns" / "artifacts", result=result)


def world_enterable_folder(prefix: str) -> Path:
    """A new folder under the project's cache that the postgres user can enter (PostgreSQL runs as that user when
    we are root, and cannot enter pytest's root-only temporary folders)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=CACHE, prefix=prefix))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="session")
def postgres_server():
    """`quantbench server --store postgresql --detach` in a folder whose path has a space and shell syntax (nothing
    may pass it through a shell: `$(touch INJECTED)` must stay a name); `quantbench server stop` after, checked."""
    parent = world_enterable_folder("test-server-")
    folder = parent / "mlflow store $(touch INJECTED)"
    cli = [sys.executable, "-m", "quantbench", "server", "--mlruns", str(folder)]
    port = free_port()
    up = subprocess.run([*cli, "--store", "postgresql", "--detach", "--port", str(port), "--pg-port", str(free_port())],
                        capture_output=True, text=True, timeout=300, cwd=parent)  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{port}", folder
    finally:
        down = subprocess.run([*cli, "stop"], capture_output=True, text=True, timeout=120, cwd=parent)
        assert down.returncode == 0 and "Stopped" in down.stderr, down.stderr
        assert not (folder / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL still running"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        assert not list(parent.rglob("INJECTED")), "a path was passed through a shell"
        shutil.rmtree(parent, ignore_errors=True)


@contextlib.contextmanager
def mlflow_service(command: str, mlruns: Path):
    """`quantbench ui|server` over the store in `mlruns`, on a free port of 127.0.0.1, up (its /health answers)
    for the duration of the block; yields its URL. Stopped with its worker processes afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "quantbench", command, "--port", str(port), "--mlruns", str(mlruns)]
    log = mlruns.parent / f"{command}-{port}.log"
    with log.open("w") as out:
        service = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(url, service, log)
        yield url
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=30)
