"""What a job logs of its model folder (tracking.log_model), on a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.together import run_together
from quantbench.errors import ConfigError
from quantbench.tracking.writer import MODEL_LOCATION_TAG, Tracker, check


@pytest.mark.parametrize("mode", ["copy", "reference", "none"])
def test_the_model_folder_is_the_runs_logged_model_copied_or_referenced(tmp_path, mode):
    """MLflow 3's own model view: the run lists its logged model as an output (the runs page's Models column), with
    every metric the run had (the Models tab), the method's params and the run's tags; copy stores the folder's
    files in the model and nowhere else, reference stores only their location and sha256s; none logs no model."""
    from mlflow.entities import LoggedModelStatus

    from quantbench import measure
    from quantbench.tracking import logged_model

    folder = tmp_path / "job" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    cfg = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": None,
                            "log_model": mode})  # fmt: skip
    tracker = Tracker(cfg)
    job = OmegaConf.create({"method": {"name": "fp16", "bits": 16}, "eval": {"limit": 8}})
    with tracker.run(job, "fp16-qwen2.5", {"method": "fp16"}, key="k"):
        tracker.log_metrics({"disk_gb": 0.5})
        tracker.log_metrics({"t1_acc": 0.25}, step=0)
        tracker.log_metrics({"t1_acc": 0.5}, step=1)  # a repeat: the whole history goes with the model
        tracker.log_json(measure.file_sha256(folder), measure.MODEL_SHA256)  # as the verify stage does
        model_id = tracker.log_model(folder, mode)
    client = tracker.client
    run = client.get_run(tracker.run_id)
    assert not client.list_artifacts(tracker.run_id, "model")  # never a second copy under the run's artifacts
    assert run.data.tags.get(MODEL_LOCATION_TAG) == (folder.resolve().as_uri() if mode == "reference" else None)
    assert len(client.get_metric_history(tracker.run_id, "t1_acc")) == 2  # linking logged no value twice
    if mode == "none":
        assert model_id is None and not run.outputs.model_outputs
        assert not client.search_logged_models([run.info.experiment_id])
        return
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    model = logged_model.of_run(client, tracker.run_id)
    assert model.model_id == model_id and model.status == LoggedModelStatus.READY
    assert model.source_run_id == tracker.run_id and model.name == "fp16-qwen2_5"
    assert model.params == {"method.name": "fp16", "method.bits": "16"}  # not the eval's
    assert model.tags["method"] == "fp16" and model.tags["config_hash"] == "k" and model.tags["log_model"] == mode
    linked = sorted((m.key, m.value, m.step) for m in model.metrics)
    assert linked == [("disk_gb", 0.5, 0), ("t1_acc", 0.25, 0), ("t1_acc", 0.5, 1)]
    files = logged_model.download(model, tmp_path / "download", cfg.uri)
    if mode == "copy":
        assert sorted(p.name for p in files.iterdir()) == ["config.json"]
    else:
        assert model.tags[MODEL_LOCATION_TAG] == folder.resolve().as_uri()
        assert json.loads((files / measure.MODEL_SHA256).read_text()) == measure.file_sha256(folder)
        assert sorted(p.name for p in files.iterdir()) == [measure.MODEL_SHA256]


def test_a_logged_model_whose_files_fail_to_upload_is_failed_and_the_error_raised(tmp_path):
    """A model is READY only once its files are stored: a file that vanished mid-upload leaves a FAILED model, which
    `make register` does not take for the run's model; a folder that is not there logs no model at all."""
    from mlflow.entities import LoggedModelStatus

    from quantbench.tracking import logged_model

    cfg = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_root": None,
                            "log_model": "copy"})  # fmt: skip
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tmp_path / "deleted")  # listed, then not there to read
    tracker = Tracker(cfg)
    with pytest.raises(FileNotFoundError, match="is not there"):
        with tracker.run(OmegaConf.create({"method": "fp16"}), "r", {}, key="k"):
            tracker.log_model(tmp_path / "gone", "copy")
    assert not tracker.client.search_logged_models([tracker.experiment_id])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        with tracker.run(OmegaConf.create({"method": "fp16"}), "r", {}, key="k"):
            tracker.log_model(folder, "copy")
    (model,) = tracker.client.search_logged_models([tracker.experiment_id])
    assert model.status == LoggedModelStatus.FAILED
    assert logged_model.of_run(tracker.client, tracker.run_id) is None


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


def _tracker_cfg(uri: str):
    return OmegaConf.create({"uri": uri, "experiment": "e", "artifact_root": None, "log_model": "none"})


def _silent_listener():
    """A socket of 127.0.0.1 that accepts connections (the kernel's backlog) but never answers: a hung server."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


@pytest.mark.parametrize("kind", ["nothing listens", "listens, never answers", "database port closed"])
def test_an_unreachable_tracking_store_fails_within_15_s_naming_its_uri(kind):
    """MLflow's client retries a refused connection for minutes (a job waited > 90 s); the job must not."""
    import time

    from quantbench.children import free_port

    listener = _silent_listener() if kind == "listens, never answers" else None
    port = listener.getsockname()[1] if listener else free_port()
    scheme = "postgresql" if kind == "database port closed" else "http"
    uri = f"{scheme}://127.0.0.1:{port}" + ("/mlflow" if scheme == "postgresql" else "")
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError) as err:
            Tracker(_tracker_cfg(uri))
    finally:
        if listener:
            listener.close()
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"{elapsed:.1f} s"
    message = str(err.value)
    assert f"The tracking store {uri} does not answer" in message and "no run was created" in message
    assert "\n" not in message  # one paragraph


def test_the_unreachable_store_error_names_the_uri_without_its_password(monkeypatch):
    """The URI's `user:password@` goes to MLflow's own basic-auth settings, never into a message."""
    from quantbench.children import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")  # restored after the test: the Tracker sets both
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    port = free_port()
    with pytest.raises(ConfigError) as err:
        Tracker(_tracker_cfg(f"http://alice:hunter2-secret@127.0.0.1:{port}"))
    assert "hunter2-secret" not in str(err.value) and f"store http://127.0.0.1:{port} does not" in str(err.value)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "alice",
        "hunter2-secret",
    )


def test_an_https_store_whose_certificate_is_not_trusted_still_counts_as_answering(tmp_path):
    """Whether to accept the certificate is MLflow's setting (MLFLOW_TRACKING_INSECURE_TLS); an answer is an answer."""
    import http.server
    import ssl
    import subprocess
    import threading

    from quantbench import stores

    folder = tmp_path
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")], check=True,
                   capture_output=True)  # fmt: skip
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert stores.unreachable(f"https://127.0.0.1:{server.server_address[1]}") is None
    finally:
        server.shutdown()


def test_a_run_logs_no_secret_of_its_tracking_uri_its_environment_or_its_config(tmp_path, monkeypatch):
    """Params, tags, config/config.yaml, the failure reason and traceback: no password of a URI, no token of the
    environment, no value of a key named like a secret; what is not secret stays readable."""
    import mlflow

    monkeypatch.setenv("HF_TOKEN", "hf_EnvToken123456")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:env-uri-pass@tracking.example:5000")
    secrets = ["db-pass-Xyz789", "hf_EnvToken123456", "env-uri-pass", "key-in-config-42"]
    job = OmegaConf.create(
        {
            "tracking": {"uri": "postgresql://mlflow:db-pass-Xyz789@db.example:5432/mlflow"},
            "model": {"name": "tiny", "hub_token": "key-in-config-42", "prompt_tokens": 100, "tokenizer": "tok"},
            "note": "a job that mentions hf_EnvToken123456 and ${oc.env:MLFLOW_TRACKING_URI} in passing",
        }
    )
    tracker = Tracker(_tracker_cfg(f"sqlite:///{tmp_path}/mlflow.db"))
    with pytest.raises(RuntimeError):
        with tracker.run(job, "r", {"overrides": "tracking.uri=postgresql://mlflow:db-pass-Xyz789@db.example/m"}, "k"):
            raise RuntimeError("could not reach postgresql://mlflow:db-pass-Xyz789@db.example:5432/mlflow")
    run = tracker.client.get_run(tracker.run_id)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                                      dst_path=str(tmp_path / "artifacts")))  # fmt: skip
    logged = {
        "params": str(run.data.params),
        "tags": str(run.data.tags),
        "config.yaml": (folder / "config" / "config.yaml").read_text(),
        "traceback": (folder / "failure" / "traceback.txt").read_text(),
    }
    for where, text in logged.items():
        assert not [s for s in secrets if s in text], f"a secret in the run's {where}: {text[:3000]}"
    assert run.data.params["tracking.uri"] == "postgresql://***@db.example:5432/mlflow"
    assert run.data.params["model.hub_token"] == "***"
    assert (run.data.params["model.prompt_tokens"], run.data.params["model.tokenizer"]) == ("100", "tok")
    assert "could not reach postgresql://***@db.example:5432/mlflow" in run.data.tags["failure_reason"]


def test_log_records_are_masked_whatever_handler_writes_them(monkeypatch):
    """The job log (Hydra's file and console handlers, which Hydra replaces per job, and MLflow's own handler)."""
    import logging

    from quantbench import redact

    monkeypatch.setenv("HF_TOKEN", "hf_EnvToken123456")
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored after the test
    redact.install_log_filter()
    redact.install_log_filter()  # idempotent
    redact.remember_environment()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(logging.Formatter().format(record))
    log = logging.getLogger("quantbench.test.redact")
    log.addHandler(handler)
    try:
        log.warning("connecting to %s with %s", "postgresql://u:db-pass-Xyz789@db:5432/m", "hf_EnvToken123456")
        try:
            raise RuntimeError("refused: http://u:p4ssw0rd@host/api")
        except RuntimeError:
            log.exception("failed")
        log.warning("%d tokens, nothing secret", 100)
    finally:
        log.removeHandler(handler)
    assert records[0] == "connecting to postgresql://***@db:5432/m with ***"
    assert "http://***@host/api" in records[1] and "p4ssw0rd" not in records[1]
    assert records[2] == "100 tokens, nothing secret"


def test_the_driver_sqlalchemy_picks_for_a_postgresql_uri_is_pinned_and_imports():
    """`tracking.uri=postgresql://...` (a team's MLflow database reached directly): SQLAlchemy 2.1 serves it with
    psycopg 3, so the lock must carry psycopg (not only psycopg2, which failed with `No module named 'psycopg'`)."""
    import importlib
    import re

    from sqlalchemy.engine import make_url

    from conftest import ROOT

    driver = make_url("postgresql://user@127.0.0.1/mlflow").get_dialect().driver
    lock = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", (ROOT / "requirements-lock.txt").read_text(), re.M))
    assert driver in lock and f"{driver}-binary" in lock, f"requirements-lock.txt does not pin {driver}"
    assert importlib.import_module(driver).pq.__impl__ == "binary"  # the wheel with its own libpq, no compiler


def test_a_job_given_an_unreachable_tracking_server_exits_at_once_with_one_paragraph(tmp_path):
    """`python run.py tracking=server` with nothing at MLFLOW_TRACKING_URI: the store is checked before the job's heavy
    imports; the exit is non-zero with the paragraph naming the URI, no traceback. (The check itself is timed above;
    here the bound only catches MLflow's retries, since a busy machine's imports take seconds of their own.)"""
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from quantbench.children import free_port

    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "tracking=server", f"hydra.run.dir={tmp_path}/out"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    elapsed = time.monotonic() - started
    print(f"run.py with an unreachable tracking server exited after {elapsed:.1f} s")
    assert out.returncode != 0
    assert f"The tracking store {url} does not answer ([Errno 111] Connection refused)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and elapsed < 60


TRACKER = """
from omegaconf import OmegaConf
from quantbench.tracking.writer import Tracker
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
