"""Fault suite, processes: a real `run.py` job stopped with SIGTERM or killed with SIGKILL mid-way (its vLLM engine
starting, its fresh-process artifact check running), its engine killed under it, its tracking server killed under it.

Every case asserts a clear message, a non-zero exit, that no process of the job (nor of the server) is left running,
checked over the process tree and the process groups recorded before the fault, and that the runs the store held
before (FINISHED or FAILED) are unchanged."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import CACHE, ROOT, run_cli
from quantbench.children import free_port
from quantbench.ops import server

pytestmark = pytest.mark.e2e

QUICK = ("method=fp16", "eval=none", "quality=none", "bench=none")  # load, save, check the artifact, log: ~1 min
VLLM = ("method=fp16", "eval=none", "quality=none", "bench=smoke", "bench.backend=vllm")
ENGINE = "quantbench.job.bench.backends._vllm_engine"
ARTIFACT_CHECK = "quantbench.job.fingerprint"


@pytest.fixture(scope="module")
def store(tiny_root, tmp_path_factory) -> Path:
    """A local store (`<folder>/mlruns`) holding one FINISHED run, which no fault may change."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "baseline").mkdir()
    run_cli(*QUICK, mlruns=folder / "mlruns", workdir=folder / "baseline")
    return folder


def ended_runs(uri: str) -> dict[str, tuple]:
    """Every FINISHED or FAILED run of the store: (status, end time, metrics, params, tags) by run id."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.info.run_id: (r.info.status, r.info.end_time, r.data.metrics, r.data.params, r.data.tags)
            for r in runs if r.info.status in ("FINISHED", "FAILED")}  # fmt: skip


def earlier(after: dict[str, tuple], before: dict[str, tuple]) -> dict[str, tuple]:
    """The runs of `after` that `before` had: equal to `before` when the fault changed none of them and lost none."""
    return {k: v for k, v in after.items() if k in before}


def local_uri(store: Path) -> str:
    return f"sqlite:///{store}/mlruns/mlflow.db"


def start_job(store: Path, workdir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python run.py <overrides>` on the store, as run_cli runs it, in a session of its own (so that the test can
    tell its process groups from its own); its output in `workdir`/console.txt."""
    workdir.mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"paths.mlruns={store}/mlruns",
           f"hydra.run.dir={workdir}/outputs", f"quantized_cache.dir={workdir}/quantized"]  # fmt: skip
    env = {
        **os.environ,
        "QUANTBENCH_CACHE": str(CACHE),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    with (workdir / "console.txt").open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)


def wait_for_child(job: subprocess.Popen, module: str, timeout_s: float = 900) -> psutil.Process:
    """The job's descendant that runs `python -m <module>` (not the guard that started it), once it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended ({job.returncode}) before {module} started"
        for p in psutil.Process(job.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = p.cmdline()
                if cmdline[1:3] == ["-m", module] and "--probe" not in cmdline:
                    return p
        time.sleep(0.2)
    raise AssertionError(f"{module} did not start within {timeout_s} s")


def process_tree(top: int) -> tuple[list[psutil.Process], set[int]]:
    """`top` and its descendants now, and their process groups."""
    procs = [psutil.Process(top), *psutil.Process(top).children(recursive=True)]
    groups = set()
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    groups.discard(os.getpgid(0))  # never this test's own group
    return procs, groups


def left_running(procs: list[psutil.Process], groups: set[int], timeout_s: float = 30) -> list[str]:
    """What is still running, after up to `timeout_s`, of `procs` (the same processes: psutil checks their start
    time) and of any process in `groups`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE and p not in alive:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in alive if p.is_running()]
        time.sleep(0.2)


def kill_all(procs: list[psutil.Process], groups: set[int]) -> None:
    """Cleanup after a failed assertion: nothing a test started may outlive it."""
    for g in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def the_run(uri: str, run_ids_before: set[str] | None = None):
    """The one run of the store that was not there before."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (new,) = [r for r in runs if r.info.run_id not in (run_ids_before or set())]
    return new


def all_run_ids(uri: str) -> set[str]:
    client = MlflowClient(uri)
    return {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


@contextlib.contextmanager
def inside(store: Path, folder: Path, stage: str):
    """A vLLM-benchmarked job started and waited into `stage` (the module a child runs), 2 s in: yields the job, that
    child and the job's process tree (processes, groups) as it was then. Whatever of the tree is left when the block
    ends is killed: nothing a test started may outlive it."""
    job = start_job(store, folder, *VLLM)
    tree: tuple[list[psutil.Process], set[int]] = ([], set())
    try:
        child = wait_for_child(job, stage)
        time.sleep(2)  # well inside it: the engine loads the model, the check reloads the artifact
        tree = process_tree(job.pid)
        yield job, child, tree
    finally:
        kill_all(*tree)


@pytest.mark.parametrize("stage", [ENGINE, ARTIFACT_CHECK])
def test_sigterm_mid_job_ends_its_run_failed_naming_the_signal_and_leaves_nothing_running(store, tmp_path, stage):
    uri = local_uri(store)
    before, ids = ended_runs(uri), all_run_ids(uri)
    with inside(store, tmp_path / "job", stage) as (job, _, tree):
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=300) == 128 + signal.SIGTERM
        assert left_running(*tree) == []
    console = (tmp_path / "job" / "console.txt").read_text()
    assert "The job was stopped by SIGTERM (signal 15)" in console, console[-3000:]
    run = the_run(uri, ids)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_type"] == "SIGTERM" and "stopped by SIGTERM" in run.data.tags["failure_reason"]
    assert earlier(ended_runs(uri), before) == before


@pytest.mark.parametrize("stage", [ENGINE, ARTIFACT_CHECK])
def test_sigkill_mid_job_leaves_nothing_running_and_the_next_job_reaps_its_run(store, tmp_path, stage):
    """SIGKILL runs no handler: the children must go by themselves, at once (within 10 s: a child that merely ends
    later, e.g. on its next write to the closed pipe or when its work is done, does not count)."""
    uri = local_uri(store)
    before, ids = ended_runs(uri), all_run_ids(uri)
    with inside(store, tmp_path / "job", stage) as (job, _, tree):
        job.kill()
        assert job.wait(timeout=60) == -signal.SIGKILL
        assert left_running(*tree, timeout_s=10) == [], "the job's children outlived it (killed with SIGKILL)"
    killed = the_run(uri, ids)
    assert killed.info.status == "RUNNING"  # nothing could end it: the process had no chance
    (tmp_path / "next").mkdir()
    run_cli(*QUICK, mlruns=store / "mlruns", workdir=tmp_path / "next")
    reaped = MlflowClient(uri).get_run(killed.info.run_id)
    assert reaped.info.status == "FAILED" and reaped.data.tags["failure_type"] == "Interrupted"
    assert f"pid {job.pid}" in reaped.data.tags["failure_reason"]
    assert earlier(ended_runs(uri), before) == before


def test_an_engine_killed_under_the_job_ends_its_run_failed_saying_so(store, tmp_path):
    uri = local_uri(store)
    before, ids = ended_runs(uri), all_run_ids(uri)
    with inside(store, tmp_path / "job", ENGINE) as (job, engine, tree):
        engine.kill()
        assert job.wait(timeout=600) != 0
        assert left_running(*tree) == []
    console = (tmp_path / "job" / "console.txt").read_text()
    assert "the vLLM engine process was killed by SIGKILL" in console, console[-3000:]
    run = the_run(uri, ids)
    assert run.info.status == "FAILED"
    assert "the vLLM engine process was killed by SIGKILL" in run.data.tags["failure_reason"]
    assert earlier(ended_runs(uri), before) == before


def test_a_tracking_server_killed_mid_run_ends_the_job_with_a_clear_error_and_leaves_nothing(store, tmp_path):
    """The server (SQLite, over the store's own database) is killed with SIGKILL while the job checks its artifact:
    its MLflow dies with it, the job fails at its next call to the store and says the run could not be marked, and
    the store's earlier runs are intact; the next local job on the store reaps the run left RUNNING."""
    uri = local_uri(store)
    before, ids = ended_runs(uri), all_run_ids(uri)
    port = free_port()
    up = subprocess.run([sys.executable, "-m", "quantbench", "server", "--mlruns", str(store / "mlruns"), "--port",
                         str(port), "--detach"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    recorded = json.loads(server.pid_file(store / "mlruns").read_text())
    served = psutil.Process(recorded["pid"] if isinstance(recorded, dict) else recorded)
    server_procs, server_groups = process_tree(served.pid)
    # MLflow's default retries (7, with backoff) would hold the job ~4 minutes per call: the outcome is the same
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    job = start_job(store, tmp_path / "job", *QUICK, "tracking=server", "force=true", env=env)
    procs, groups = [], set()
    try:
        wait_for_child(job, ARTIFACT_CHECK)
        procs, groups = process_tree(job.pid)
        served.kill()
        assert left_running(server_procs, server_groups) == [], "the server's MLflow outlived it"
        assert job.wait(timeout=600) != 0
        assert left_running(procs, groups) == []
    finally:
        kill_all(procs + server_procs, groups | server_groups)
        server.stop(store / "mlruns")  # only removes the stale pid file: its pid is checked first
    console = (tmp_path / "job" / "console.txt").read_text()
    assert f"could not be marked FAILED: the tracking store http://127.0.0.1:{port} stopped answering" in console, (
        console[-3000:]
    )
    assert ended_runs(uri) == before
    orphan = the_run(uri, ids)
    assert orphan.info.status == "RUNNING"
    (tmp_path / "next").mkdir()
    run_cli(*QUICK, mlruns=store / "mlruns", workdir=tmp_path / "next")
    assert MlflowClient(uri).get_run(orphan.info.run_id).data.tags["failure_type"] == "Interrupted"
