"""`quantbench server --store postgresql`: a real `mlflow server` on 127.0.0.1 serving artifacts from a PostgreSQL
cluster of its own (tests/conftest.py starts and stops it with the CLI), and writers logging to it at the same time."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

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


def test_a_missing_postgresql_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        server.postgres_binary("initdb")
