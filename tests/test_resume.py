"""Sweeps that lose nothing: a rerun does only what is missing, a killed job's run is marked interrupted by the next
job on the store, and every multirun ends with a table of what each job did."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time


import psutil
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import CACHE, ROOT, run_cli
from quantbench import children
from quantbench.study import runs as runs_module
from quantbench.tracking import logged_model
from quantbench.tracking.writer import Tracker

QUICK = ("method=fp16", "eval=none", "bench=none")  # a whole job in seconds: load, save, verify, log


# --- unit: the liveness check (the job's identity: test_identity.py) -----------------------------------------------


def _running_run(tracker: Tracker, name: str, tags: dict[str, str]) -> str:
    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags=tags)
    return run.info.run_id


def test_only_runs_whose_process_is_gone_on_this_host_are_marked_interrupted(tmp_path):
    tracker = Tracker(
        OmegaConf.create(
            {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": str(tmp_path / "artifacts")}
        )
    )
    here, me = platform.node(), psutil.Process()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = _running_run(
        tracker, "alive", {"host.name": here, "pid": str(me.pid), "pid_started": children.start_stamp(me.pid)}
    )
    gone = _running_run(tracker, "gone", {"host.name": here, "pid": str(dead.pid)})
    reused = _running_run(tracker, "reused", {"host.name": here, "pid": str(me.pid), "pid_started": "12345.0"})
    elsewhere = _running_run(tracker, "elsewhere", {"host.name": here + "-other", "pid": str(dead.pid)})
    assert sorted(tracker.fail_interrupted_runs()) == sorted([gone, reused])
    status = {r: tracker.client.get_run(r).info.status for r in (alive, gone, reused, elsewhere)}
    assert status == {alive: "RUNNING", gone: "FAILED", reused: "FAILED", elsewhere: "RUNNING"}
    tags = tracker.client.get_run(gone).data.tags
    assert tags["failure_type"] == "Interrupted" and "interrupted" in tags["failure_reason"]


# --- end to end: the CLI on a real store -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_sweep_killed_in_its_second_job_is_completed_by_rerunning_it_and_force_reruns(tiny_root, tmp_path):
    """SIGKILL during job 2 of 3 (nothing can end its run), then the same command again: job 1 is skipped, the killed
    run is marked FAILED (interrupted), jobs 2 and 3 run, each job has exactly one FINISHED run, and the rerun's
    sweep reports all three. Then `force=true` runs a finished job again."""
    mlruns = tmp_path / "mlruns"
    uri = f"sqlite:///{mlruns}/mlflow.db"
    sweep = ["-m", "seed=0,1,2", *QUICK, "quality=none"]
    cmd = [sys.executable, str(ROOT / "run.py"), *sweep, f"paths.mlruns={mlruns}",
           f"hydra.sweep.dir={tmp_path}/multirun", f"quantized_cache.dir={tmp_path}/quantized"]  # fmt: skip
    env = {**os.environ, "QUANTBENCH_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log_path = tmp_path / "killed-sweep.log"
    with log_path.open("w") as log:
        job = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300  # until the second job is at work: its run exists and is RUNNING
        while log_path.read_text().count("Quantizing") < 2 and time.monotonic() < deadline:
            assert job.poll() is None, "the sweep ended early:\n" + log_path.read_text()[-3000:]
            time.sleep(0.1)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("quantbench-tiny")
        running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
        assert len(running) == 1, "no RUNNING run to kill:\n" + log_path.read_text()[-3000:]
        killed = running[0].info.run_id
        assert running[0].data.params["seed"] == "1"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert client.get_run(killed).info.status == "RUNNING"  # SIGKILL: nothing could end it

    again = run_cli(*sweep, mlruns=mlruns, workdir=tmp_path)
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(killed).data.tags["failure_type"] == "Interrupted"
    assert "marked FAILED (interrupted)" in again.result.stdout
    assert "Sweep summary (2 FINISHED, 1 SKIPPED)" in again.result.stdout
    finished = [r for r in again.runs() if r.info.status == "FINISHED"]
    assert sorted(r.data.params["seed"] for r in finished) == ["0", "1", "2"]  # none twice, none lost
    assert len(again.runs()) == 4  # and the interrupted one, kept as FAILED
    # the skipped run counts as the new sweep's: its report has all three
    sweep_id = next(r.data.tags["sweep_id"] for r in finished if r.data.params["seed"] == "2")
    selection = runs_module.Store(again.uri).select("quantbench-tiny", sweep=sweep_id)
    assert sorted(r.params["seed"] for r in selection.rows if r.run_id) == ["0", "1", "2"]

    forced = run_cli("seed=0", "force=true", *QUICK, "quality=none", mlruns=mlruns, workdir=tmp_path)
    finished = [r for r in forced.runs() if r.info.status == "FINISHED"]
    assert sorted(r.data.params["seed"] for r in finished) == ["0", "0", "1", "2"]


@pytest.mark.e2e
def test_a_rerun_is_skipped_only_while_nothing_its_results_depend_on_changed(tiny_root, tmp_path):
    """None of these changes shows in the config, each changes what a result depends on, so each reruns the job:
    a run that logged no model cannot stand for one that must log it, a model folder retrained in place is another
    model, an edit to quantbench's own source (uncommitted) is other code. With nothing changed the job is skipped
    and names the run that stands for it."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "my-model"
    shutil.copytree(tiny_root / "model", model)
    job = (*QUICK, "quality=none", f"model.pretrained={model}")
    mlruns = tmp_path / "mlruns"

    def finished(store) -> list:
        return [r for r in store.runs() if r.info.status == "FINISHED"]

    run_cli(*job, "tracking.log_model=none", mlruns=mlruns, workdir=tmp_path)
    copy = run_cli(*job, "tracking.log_model=copy", mlruns=mlruns, workdir=tmp_path)
    assert "Skipping" not in copy.result.stdout and len(finished(copy)) == 2
    logged = logged_model.of_run(copy.client, finished(copy)[-1].info.run_id)  # as log_model=copy asks
    assert any(a.path.endswith(".safetensors") for a in copy.client.list_logged_model_artifacts(logged.model_id))
    assert logged_model.of_run(copy.client, finished(copy)[0].info.run_id) is None  # log_model=none: no model

    again = run_cli(*job, "tracking.log_model=copy", mlruns=mlruns, workdir=tmp_path)
    assert f"Skipping fp16: run {finished(copy)[-1].info.run_id}" in again.result.stdout
    assert len(again.runs()) == 2
    assert len(again.client.search_logged_models([logged.experiment_id])) == 1  # the skipped job logged no second

    weights = load_file(model / "model.safetensors")  # retrained in place: new weights under the same name
    weights = {k: v * 1.01 if k.endswith("mlp.up_proj.weight") else v for k, v in weights.items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    retrained = run_cli(*job, "tracking.log_model=copy", mlruns=mlruns, workdir=tmp_path)
    assert "Skipping" not in retrained.result.stdout and len(finished(retrained)) == 3

    edited = tmp_path / "edited-src"
    shutil.copytree(ROOT / "src" / "quantbench", edited / "quantbench", ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = edited / "quantbench" / "job" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\n# an uncommitted edit\n")
    env = {"PYTHONPATH": f"{edited}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "QUANTBENCH_ROOT": str(ROOT)}
    code = run_cli(*job, "tracking.log_model=copy", mlruns=mlruns, workdir=tmp_path, env=env)
    assert "Skipping" not in code.result.stdout and len(finished(code)) == 4
    assert len({r.data.tags["config_hash"] for r in finished(code)}) == 4


# --- unit: a stage taken from an earlier run -------------------------------------------------------------------------


def _tracker(tmp_path) -> Tracker:
    return Tracker(
        OmegaConf.create(
            {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": str(tmp_path / "artifacts")}
        )
    )


def test_a_stage_is_copied_whole_from_the_run_that_measured_it_and_says_so(tmp_path, caplog):
    """Metrics with their history (a calibration repeat per step), tags and JSON artifacts, and the tag naming the
    run that measured them; a run whose record cannot be read back is not used (WARNING), the stage runs."""
    from quantbench.job.pipeline import IDENTITY_FILE, Work, _reuse

    def _reused(tracker, record, stage, force):  # what the stage's results were taken as, or None: run it
        work = Work(OmegaConf.create({}), tracker, tmp_path / "model", force, record=record)
        return work.metrics if _reuse(work, stage) else None

    tracker = _tracker(tmp_path)
    outputs = {"metrics": ["tiny_acc", "tiny_acc_repeat"], "tags": ["eval_note"], "artifacts": ["eval/samples.json"]}
    with tracker.run(OmegaConf.create({"method": "rtn"}), "first", {}, key="job-1"):
        tracker.set_tags({"identity.eval": "E1", "eval_note": "measured here"})
        tracker.log_metrics({"tiny_acc": 0.75})
        for step, value in enumerate((0.75, 0.70, 0.80)):
            tracker.log_metrics({"tiny_acc_repeat": value}, step=step)
        tracker.log_json({"tiny": [{"doc_id": 0, "acc": 1.0}]}, "eval/samples.json")
        tracker.log_json({"eval": {"key": "E1", "outputs": outputs}}, IDENTITY_FILE)
        first = tracker.run_id
    with tracker.run(OmegaConf.create({"method": "rtn"}), "second", {}, key="job-2"):
        record = {"eval": {"key": "E1"}}
        assert _reused(tracker, record, "eval", force=True) is None  # force=true measures again
        assert _reused(tracker, record, "eval", force=False) == {"tiny_acc": 0.75, "tiny_acc_repeat": 0.80}
        second = tracker.run_id
    run = tracker.client.get_run(second)
    assert run.data.tags["eval_resumed_from"] == first and run.data.tags["eval_note"] == "measured here"
    history = tracker.client.get_metric_history(second, "tiny_acc_repeat")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.75), (1, 0.70), (2, 0.80)]
    assert tracker.read_json(second, "eval/samples.json") == {"tiny": [{"doc_id": 0, "acc": 1.0}]}
    assert record["eval"]["resumed_from"] == first and record["eval"]["outputs"] == outputs

    with tracker.run(OmegaConf.create({"method": "rtn"}), "third", {}, key="job-3"):  # from a copy: the origin
        assert _reused(tracker, {"eval": {"key": "E1"}}, "eval", force=False) is not None
        third = tracker.run_id
    assert tracker.client.get_run(third).data.tags["eval_resumed_from"] == first

    with tracker.run(OmegaConf.create({"method": "rtn"}), "broken", {}, key="job-4"):
        tracker.set_tags({"identity.quality": "Q1"})  # FINISHED without a record of what the stage logged
    with tracker.run(OmegaConf.create({"method": "rtn"}), "fifth", {}, key="job-5"):
        assert _reused(tracker, {"quality": {"key": "Q1"}}, "quality", force=False) is None
    assert "Cannot take the quality results of run" in caplog.text
