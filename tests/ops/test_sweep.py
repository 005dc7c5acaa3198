"""The end of a sweep: runs that a dead worker left RUNNING end FAILED with the reason; nothing else is touched."""

from __future__ import annotations

from helpers.synthetic_store import make_store

from quantbench.ops import sweep


def start(client, exp, method, sweep_dir, **tags):
    run = client.create_run(exp, run_name=f"{method}-tiny", tags={"method": method, "sweep_dir": sweep_dir, **tags})
    return run.info.run_id


def test_runs_a_dead_worker_left_running_end_failed_with_the_reason(tmp_path, monkeypatch):
    uri, client, exp = make_store(tmp_path / "mlruns")
    this, other = str(tmp_path / "multirun" / "a"), str(tmp_path / "multirun" / "b")
    lost = start(client, exp, "awq", this, launcher="ray")
    done = start(client, exp, "fp16", this)
    client.set_terminated(done, "FINISHED")
    elsewhere = start(client, exp, "gptq", other)
    queued = start(client, exp, "rtn", this, launcher="slurm", **{"slurm.job_id": "7_1"})
    monkeypatch.setattr(sweep, "slurm_job_queued", lambda job: job == "7_1")  # the seam: SLURM's queue

    assert sweep.end_orphaned_runs(client, "quantbench-tiny", this) == [lost]
    run = client.get_run(lost)
    assert run.info.status == "FAILED" and run.data.tags["failure_type"] == "WorkerLost"
    assert "worker ended without ending the run" in run.data.tags["failure_reason"]
    assert [client.get_run(r).info.status for r in (done, elsewhere, queued)] == ["FINISHED", "RUNNING", "RUNNING"]


def test_a_logged_model_a_dead_worker_was_storing_ends_failed_with_its_run(tmp_path):
    from mlflow.entities import LoggedModelStatus

    uri, client, exp = make_store(tmp_path / "mlruns")
    this = str(tmp_path / "multirun" / "a")
    lost, alive = start(client, exp, "awq", this, launcher="ray"), start(client, exp, "gptq", this + "-other")
    storing = client.create_logged_model(exp, name="awq-tiny", source_run_id=lost)  # PENDING: killed mid-upload
    other = client.create_logged_model(exp, name="gptq-tiny", source_run_id=alive)
    assert sweep.end_orphaned_runs(client, "quantbench-tiny", this) == [lost]
    assert client.get_logged_model(storing.model_id).status == LoggedModelStatus.FAILED
    assert client.get_logged_model(other.model_id).status == LoggedModelStatus.PENDING


def test_a_slurm_job_the_queue_no_longer_holds_is_ended_too(tmp_path, monkeypatch):
    uri, client, exp = make_store(tmp_path / "mlruns")
    this = str(tmp_path / "multirun" / "a")
    gone = start(client, exp, "rtn", this, launcher="slurm", **{"slurm.job_id": "8_0"})
    monkeypatch.setattr(sweep, "slurm_job_queued", lambda job: False)
    assert sweep.end_orphaned_runs(client, "quantbench-tiny", this) == [gone]
