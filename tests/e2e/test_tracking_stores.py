"""Real jobs (`python run.py`) logging to the test tracking server's PostgreSQL directly (a team's MLflow database
reached with a postgresql:// URI) and to the server over HTTP with `user:password@` in the URI: both FINISH, and no
password or token reaches the run's params, tags, config/config.yaml, the job log or the console."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

QUICK_JOB = ("method=fp16", "eval=none", "quality=none", "bench=none", "tracking=server")
HF_TOKEN = "hf_e2eTokenNotForLogs123"


def _database_uri(folder: Path) -> tuple[str, str]:
    """(postgresql:// URI with the password in it, the password) of the test server's own database."""
    password = (folder / "postgres" / "pgpass").read_text().strip().rsplit(":", 1)[1]
    port = int((folder / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[3])
    return f"postgresql://postgres:{password}@127.0.0.1:{port}/mlflow", password


def _everything_logged(url: str, experiment: str, workdir: Path, console: str) -> dict[str, str]:
    """What the job's one run and the job itself logged, read back through the server at `url`."""
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
    config = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config/config.yaml",
                                                 tracking_uri=url, dst_path=str(workdir / "downloaded"))  # fmt: skip
    (job_log,) = workdir.rglob("quantbench.log")
    return {
        "params": str(run.data.params),
        "tags": str(run.data.tags),
        "config/config.yaml": Path(config).read_text(),
        "job log": job_log.read_text(),
        "console": console,
    }


@pytest.mark.e2e
def test_a_job_logs_to_a_postgresql_uri_directly_and_logs_neither_its_password_nor_a_token(
    postgres_server, tiny_root, tmp_path, monkeypatch
):
    url, folder = postgres_server
    uri, password = _database_uri(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how a team passes a secret URI: not on the command line
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    store = run_cli(*QUICK_JOB, f"tracking.artifact_root={tmp_path}/artifacts", "tracking.experiment=direct-database",
                    mlruns=tmp_path / "mlruns", workdir=tmp_path, timeout=900)  # fmt: skip
    # the server reads the same database: the run is there for everyone who uses the server
    logged = _everything_logged(url, "direct-database", tmp_path, store.result.stdout)
    for where, text in logged.items():
        assert password not in text and HF_TOKEN not in text, f"a secret in the {where}:\n{text[-3000:]}"
    assert "postgresql://***@127.0.0.1:" in logged["params"]


@pytest.mark.e2e
def test_a_job_given_user_and_password_in_an_http_uri_logs_neither(postgres_server, tiny_root, tmp_path):
    url, _ = postgres_server
    password = "pw-on-the-command-line-42"
    secret_url = url.replace("http://", f"http://alice:{password}@")
    # -m: a sweep's job, which tags its overrides (the URI among them)
    store = run_cli("-m", *QUICK_JOB, f"tracking.uri={secret_url}", "tracking.experiment=http-credentials",
                    mlruns=tmp_path / "mlruns", workdir=tmp_path, timeout=900)  # fmt: skip
    logged = _everything_logged(url, "http-credentials", tmp_path, store.result.stdout)
    for where, text in logged.items():
        assert password not in text, f"the password in the {where}:\n{text[-3000:]}"
    assert re.search(r"tracking.uri=http\\*://\*\*\*@127.0.0.1", logged["tags"])  # the overrides tag (Hydra escapes :)
    assert f"View run fp16-tiny at: {url}/#/experiments/" in logged["console"]  # MLflow's own line, without it
