"""What a job logs of its model folder (tracking.log_model), on a real SQLite MLflow store."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

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
