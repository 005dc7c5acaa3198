"""Parallel sweeps on the engines users already run, each job logging to a shared tracking server (PostgreSQL
behind `mlflow server`): `hydra/launcher=ray` on a local Ray head, `hydra/launcher=submitit_slurm` on a real
single-node SLURM cluster. Jobs are the cheapest real ones (fp16, rtn, bnb_nf4 without eval or bench)."""

from __future__ import annotations


import pytest
from mlflow.tracking import MlflowClient

from helpers import slurm_cluster
from helpers.ray_local import local_ray, most_at_once
from helpers.run_if import run_if
from conftest import run_cli


def runs_of(url: str, experiment: str):
    client = MlflowClient(url)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def model_files(client: MlflowClient, run_id: str) -> set[str]:
    """The files of the run's logged model (tracking.log_model=copy), as the server stores them."""
    from quantbench.tracking import logged_model

    return {a.path for a in client.list_logged_model_artifacts(logged_model.of_run(client, run_id).model_id)}


@pytest.mark.e2e
def test_a_ray_sweep_runs_two_jobs_at_a_time_and_every_run_reaches_the_server(postgres_server, tiny_root, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """Three jobs, a local Ray head with two CPUs, one CPU per job (hardware=cpu's job_cpus): two run at once, the
    third when one is done; each run names the Ray node and worker that ran it."""
    url, _ = postgres_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with local_ray(monkeypatch) as ray:
        run_cli("-m", *ray, "tracking=server", "method=fp16,bnb_nf4,rtn", "eval=none", "bench=none", "quality=none",
                "tracking.experiment=ray-sweep", mlruns=tmp_path / "unused", workdir=tmp_path)  # fmt: skip
    client, runs = runs_of(url, "ray-sweep")
    assert sorted(r.data.tags["method"] for r in runs) == ["bnb_nf4", "fp16", "rtn"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["disk_gb"] > 0
        assert run.data.tags["launcher"] == "ray" and run.data.tags["ray.node_id"]
        assert "config.json" in model_files(client, run.info.run_id)  # the run's logged model, on the server
    assert len({r.data.tags["ray.worker_id"] for r in runs}) == 3  # max_calls=1: a fresh worker per job
    assert most_at_once(runs) == 2
    assert not (tmp_path / "unused").exists()  # nothing went to a local store


# `make test` installs SLURM (`make slurm`); the daemons need root, so where the tests are not root this is skipped
# with that reason and test_the_slurm_job_asks_for_what_the_hardware_group_says below still checks the request.
@pytest.mark.e2e
@run_if(slurm=True)
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
        assert "config.json" in model_files(client, run.info.run_id)  # the run's logged model, on the server
    array_jobs = {r.data.tags["slurm.job_id"] for r in runs}
    assert len(array_jobs) == 2 and len({j.split("_")[0] for j in array_jobs}) == 1, array_jobs
    assert most_at_once(runs) == 2


def test_the_slurm_job_asks_for_what_the_hardware_group_says(monkeypatch):
    """hydra/launcher=submitit_slurm: GPUs, CPUs, memory and time limit per job come from the hardware group (and stay
    overridable), the partition from SLURM_PARTITION; Hydra types the launcher's keys with the plugin's schema."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        h100 = compose("config", ["hydra/launcher=submitit_slurm", "hardware=h100", "hardware.job_mem_gb=64"],
                       return_hydra_config=True)  # fmt: skip
        cpu = compose("config", ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=5"],
                      return_hydra_config=True)  # fmt: skip
        with pytest.raises(Exception, match="tiemout_min"):
            compose("config", ["hydra/launcher=submitit_slurm", "hydra.launcher.tiemout_min=5"])
    job = h100.hydra.launcher
    # the default sweep's slowest method on a GPU: our AQLM quantizer (methods.AQLM2Bit.time_limit_min)
    assert (job.gpus_per_node, job.cpus_per_task, job.mem_gb, job.timeout_min, job.partition) == (1, 4, 64, 2160, "gpu")
    assert job._target_.endswith("SlurmLauncher") and job.tasks_per_node == 1
    assert (cpu.hydra.launcher.gpus_per_node, cpu.hydra.launcher.cpus_per_task, cpu.hydra.launcher.timeout_min) == (
        None, 1, 5)  # fmt: skip
