"""Parallel sweeps on the engines users already run, each job logging to a shared tracking server (PostgreSQL
behind `mlflow server`): `hydra/launcher=ray` on a local Ray head, `hydra/launcher=submitit_slurm` on a real
single-node SLURM cluster. Jobs are the cheapest real ones (fp16, rtn, bnb_nf4 without eval or bench)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import slurm_cluster
from conftest import run_cli

pytestmark = pytest.mark.e2e


def runs_of(url: str, experiment: str):
    client = MlflowClient(url)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def most_at_once(runs) -> int:
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


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
                "tracking.experiment=ray-sweep", mlruns=tmp_path / "unused", workdir=tmp_path)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    client, runs = runs_of(url, "ray-sweep")
    assert sorted(r.data.tags["method"] for r in runs) == ["bnb_nf4", "fp16", "rtn"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["disk_gb"] > 0
        assert run.data.tags["launcher"] == "ray" and run.data.tags["ray.node_id"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/config.json"}
    assert len({r.data.tags["ray.worker_id"] for r in runs}) == 3  # max_calls=1: a fresh worker per job
    assert most_at_once(runs) == 2
    assert not (tmp_path / "unused").exists()  # nothing went to a local store


# Skipped only outside CI: CI installs SLURM (`make slurm`) and runs as root, so there a missing cluster fails.
@pytest.mark.skipif(
    slurm_cluster.unavailable_reason() is not None and not os.environ.get("CI"),
    reason=str(slurm_cluster.unavailable_reason()),
)
def test_a_slurm_sweep_runs_its_jobs_as_one_job_array_and_every_run_names_its_slurm_job(postgres_server, tiny_root,
                                                                                        tmp_path, monkeypatch):  # fmt: skip
    """Two jobs through Submitit on a one-node cluster with two CPUs, one CPU per job (hardware=cpu): both run at
    once, as tasks of one array, and each run names its SLURM job and node."""
    url, _ = postgres_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with slurm_cluster.running(tmp_path / "slurm", cpus=2) as env:
        monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
        run_cli("-m", "hydra/launcher=submitit_slurm", "tracking=server", "method=fp16,rtn", "eval=none",
                "bench=none", "quality=none", "tracking.experiment=slurm-sweep",
                mlruns=tmp_path / "unused", workdir=tmp_path)  # fmt: skip
    client, runs = runs_of(url, "slurm-sweep")
    assert sorted(r.data.tags["method"] for r in runs) == ["fp16", "rtn"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["disk_gb"] > 0
        assert run.data.tags["launcher"] == "slurm" and run.data.tags["slurm.node"] == "localhost"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/config.json"}
    array_jobs = {r.data.tags["slurm.job_id"] for r in runs}
    assert len(array_jobs) == 2 and len({j.split("_")[0] for j in array_jobs}) == 1, array_jobs
    assert most_at_once(runs) == 2
