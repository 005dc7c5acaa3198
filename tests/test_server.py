"""A team's setup on one machine: `quantbench server --store postgresql` (a real PostgreSQL cluster and a real
`mlflow server` on 127.0.0.1, serving artifacts) and jobs that write to it at the same time, from processes and from
Ray workers (`hydra/launcher=ray`), with nothing shared but the server's URL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import CACHE, run_cli
from quantbench import server

WRITER = """
import sys, tempfile, pathlib
from omegaconf import OmegaConf
from quantbench.tracking import Tracker
n = int(sys.argv[2])
tracker = Tracker(OmegaConf.create({"uri": sys.argv[1], "experiment": "concurrent-writers", "artifact_root": None}))
with tracker.run(OmegaConf.create({"writer": n}), f"writer-{n}", {"writer": str(n)}, key=f"k{n}"):
    for step in range(40):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "step_seen": step}, step=step)
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    tracker.log_folder(folder, "model")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """`quantbench server --store postgresql --detach` in a folder under the project's cache (PostgreSQL runs as the
    postgres user, who cannot enter pytest's root-only temporary folders); stopped, and checked stopped, after."""
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=CACHE, prefix="test-server-"))
    folder.chmod(0o755)
    url = server.start_detached(folder, free_port(), "postgresql", free_port())
    try:
        yield url, folder
    finally:
        assert server.stop(folder)
        assert not (folder / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL still running"
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.e2e
def test_four_writers_at_once_lose_nothing_on_the_postgresql_server(postgres_server):
    url, folder = postgres_server
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(n)], stderr=subprocess.PIPE, text=True)
               for n in range(4)]  # fmt: skip
    for w in writers:
        assert w.wait(timeout=300) == 0, w.stderr.read()[-3000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("concurrent-writers")  # one experiment, though four created it at once
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["writer"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 40
        assert run.data.params["writer"] == run.data.tags["writer"]
        (weights,) = client.list_artifacts(run.info.run_id, "model")
        assert weights.file_size == 256 * 4096
    assert (
        len(list((folder / "postgres" / "artifacts").rglob("weights.bin"))) == 4
    )  # sent over HTTP, stored by the server


@pytest.mark.e2e
def test_a_ray_sweep_runs_two_jobs_at_a_time_and_every_run_reaches_the_server(postgres_server, tiny_root, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """Three jobs, a local Ray head with two CPUs, one CPU per job (hardware=cpu's job_cpus): two run at once, the
    third when one is done; each run names the Ray node and worker that ran it."""
    url, _ = postgres_server
    ray_tmp = Path(tempfile.mkdtemp(prefix="qbray", dir="/tmp"))  # Ray's socket paths must stay under 107 characters
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a local head
    try:
        run_cli("-m", "hydra/launcher=ray", "tracking=server", "method=fp16,bnb_nf4,rtn",
                "eval=none", "bench=none", "quality=none",
                "+hydra.launcher.ray.init.num_cpus=2", f"+hydra.launcher.ray.init._temp_dir={ray_tmp}",
                mlruns=tmp_path / "unused", workdir=tmp_path)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("quantbench-tiny").experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == ["bnb_nf4", "fp16", "rtn"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["disk_gb"] > 0
        assert run.data.tags["launcher"] == "ray" and run.data.tags["ray.node_id"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/config.json"}
    assert len({r.data.tags["ray.worker_id"] for r in runs}) == 3  # max_calls=1: a fresh worker per job
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert at_once == 2, spans
    assert not (tmp_path / "unused").exists()  # nothing went to a local store


def test_a_missing_postgresql_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        server.postgres_binary("initdb")


@pytest.mark.e2e
def test_quantbench_server_detached_on_sqlite_takes_runs_over_http_and_stops(tmp_path):
    """The one-machine server (`quantbench server --detach`, SQLite store): a run and its files arrive over HTTP and
    land in the server's folder; `quantbench server stop` ends it."""
    cli = [sys.executable, "-m", "quantbench", "server", "--mlruns", str(tmp_path)]
    port = free_port()
    up = subprocess.run([*cli, "--detach", "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        writer = subprocess.run([sys.executable, "-c", WRITER, url, "0"], capture_output=True, text=True, timeout=300)
        assert writer.returncode == 0, writer.stderr[-3000:]
        (run,) = MlflowClient(url).search_runs(
            [MlflowClient(url).get_experiment_by_name("concurrent-writers").experiment_id]
        )
        assert run.info.status == "FINISHED"
        assert list(tmp_path.glob("artifacts/**/model/weights.bin")) and (tmp_path / "mlflow.db").exists()
    finally:
        down = subprocess.run([*cli, "stop"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "Stopped" in down.stderr, down.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)
