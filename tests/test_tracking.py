"""What a job logs of its model folder (tracking.log_model), on a real SQLite MLflow store."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from helpers.together import run_together
from quantbench.errors import ConfigError
from quantbench.tracking import MODEL_LOCATION_TAG, Tracker, check


@pytest.mark.parametrize("mode", ["copy", "reference", "none"])
def test_the_model_folder_is_copied_referenced_or_left_out(tmp_path, mode):
    folder = tmp_path / "job" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    cfg = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": None,
                            "log_model": mode})  # fmt: skip
    tracker = Tracker(cfg)
    with tracker.run(OmegaConf.create({"method": "fp16"}), "r", {}, key="k"):
        tracker.log_model(folder, mode)
    run = tracker.client.get_run(tracker.run_id)
    copied = [a.path for a in tracker.client.list_artifacts(tracker.run_id, "model")]
    assert copied == (["model/config.json"] if mode == "copy" else [])
    assert run.data.tags.get(MODEL_LOCATION_TAG) == (folder.resolve().as_uri() if mode == "reference" else None)


def test_an_unknown_log_model_mode_names_the_three():
    with pytest.raises(ConfigError, match="copy.*reference.*none"):
        check(OmegaConf.create({"log_model": "True"}))


def test_a_job_failing_because_the_store_went_away_says_so_and_keeps_its_own_error(tmp_path, monkeypatch):
    """The tracking server going away mid-job: the job fails with its own error, and a note that names the store
    and says the run could not be marked FAILED (it stays RUNNING until a later job marks it Interrupted)."""
    import mlflow

    cfg = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": None})
    tracker = Tracker(cfg)
    with pytest.raises(ConnectionError, match="metrics lost") as err:
        with tracker.run(OmegaConf.create({"method": "fp16"}), "r", {}, key="k"):

            def server_gone(*args, **kwargs):
                raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/set-tag")

            monkeypatch.setattr(mlflow, "set_tags", server_gone)  # the seam: every later call to the store fails
            raise ConnectionError("metrics lost: the server closed the connection")
    note = " ".join(err.value.__notes__)
    assert "could not be marked FAILED" in note and str(tmp_path) in note and "Max retries" in note


TRACKER = """
from omegaconf import OmegaConf
from quantbench.tracking import Tracker
cfg = OmegaConf.create({"uri": sys.argv[1], "experiment": "e", "artifact_root": sys.argv[2]})
"""


def test_two_jobs_opening_a_new_sqlite_store_at_once_both_connect(tmp_path):
    """The first use of a SQLite store creates its tables; two jobs starting at once on a new file (two users, two
    sweeps) both get the store and the one experiment, instead of one failing in MLflow's migration."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    body = "print('EXPERIMENT', Tracker(cfg).experiment_id)"
    done = run_together([(TRACKER, body, [uri, str(tmp_path / "artifacts")])] * 2)
    for result in done:
        assert result.returncode == 0, result.stdout[-3000:]
    ids = {line.split()[1] for r in done for line in r.stdout.splitlines() if line.startswith("EXPERIMENT ")}
    assert len(ids) == 1
