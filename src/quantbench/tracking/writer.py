"""The only module that talks to MLflow: one run per job, params from the resolved config, metrics as they come.

Runs are started before any heavy work so that a job that fails (bad input, an exception mid-way) still
leaves a FAILED run with the reason, and everything logged up to that point stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from quantbench import atomic, measure, redact
from quantbench.tracking import logged_model
from quantbench.stores import check_reachable, mlflow_uri, unreachable
from quantbench.children import same_process
from quantbench.tracking.host import environment_tags

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def end_failed(client: MlflowClient, run_id: str, failure_type: str, reason: str) -> None:
    """End a run that its own job can no longer end (its process or worker is gone) FAILED, saying why; a logged
    model it was storing when it died ends FAILED too."""
    logged_model.fail_pending(client, client.get_run(run_id).info.experiment_id, run_id)
    client.set_tag(run_id, "failure_reason", reason)
    client.set_tag(run_id, "failure_type", failure_type)
    client.set_terminated(run_id, status="FAILED")


def end_orphaned_runs(
    client: MlflowClient,
    experiment_id: str,
    orphaned: Callable[[dict[str, str]], str | None],
    failure_type: str,
    only: str = "",
) -> list[str]:
    """The one reaper: end FAILED every RUNNING run of the experiment (those matching the MLflow filter `only`, if
    given) for which `orphaned(tags)` gives a reason, that is, whose job can no longer end it (its process or worker is
    gone). A job on this host (Tracker.fail_interrupted_runs) and a sweep's end (sweep.SweepSummary) each say which
    runs are orphaned; both end them the same way. The ids of the runs ended."""
    ended = []
    for run in client.search_runs(
        [experiment_id],
        filter_string="attributes.status = 'RUNNING'" + (f" and {only}" if only else ""),
        max_results=1000,
    ):
        reason = orphaned(dict(run.data.tags))
        if reason is None:
            continue
        end_failed(client, run.info.run_id, failure_type, reason)
        log.warning(
            "Run %s (%s) was left RUNNING: marked FAILED (%s)", run.info.run_id, run.info.run_name, failure_type.lower()
        )
        ended.append(run.info.run_id)
    return ended


LOG_MODEL_MODES = ("copy", "reference", "none")
MODEL_LOCATION_TAG = logged_model.LOCATION_TAG  # tracking.log_model=reference: where the model folder is


def check(cfg: DictConfig) -> None:
    """The tracking group's values that its schema cannot check."""
    from quantbench.errors import ConfigError

    if str(cfg.log_model) not in LOG_MODEL_MODES:
        raise ConfigError(
            f"tracking.log_model={cfg.log_model}: choose copy (log the model folder as an artifact), reference (log "
            f"its location and sha256s only, for workers on shared storage) or none."
        )


@contextmanager
def _one_quick_try() -> Iterator[None]:
    """MLflow HTTP calls that try once, for 5 s, instead of retrying for minutes: for a store found gone."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Tracker:
    """A thin wrapper that knows where the store is and which experiment a study logs to. Nothing it logs carries a
    secret (quantbench.redact)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        redact.remember_uri(str(cfg.uri))
        redact.remember_environment()
        self.uri = mlflow_uri(str(cfg.uri))
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:///"):
            # The first use of a SQLite file creates its tables (MLflow's migrations); two jobs starting on a new file
            # at once would both migrate it, and one fails. One at a time, the others then find it made.
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with atomic.file_lock(db):
                self._connect(cfg)
        else:
            self._connect(cfg)
        # what this job has logged, by name: a stage's outputs are what it added (`since`), reusable by a later job
        self.logged: dict[str, set[str]] = {"metrics": set(), "tags": set(), "artifacts": set()}

    def _connect(self, cfg: DictConfig) -> None:
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment_id(cfg.experiment, cfg.get("artifact_root"))

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if artifact_root:
            Path(artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(artifact_root).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created by a concurrent job in the meantime
            return self.client.get_experiment_by_name(name).experiment_id

    def finished_run(self, tag: str, value: str):
        """The newest FINISHED run (mlflow Run) of this experiment whose tag `tag` is `value`, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            max_results=1,
            filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def fail_interrupted_runs(self) -> list[str]:
        """End FAILED, with reason "interrupted", this experiment's RUNNING runs whose process on this host is gone
        (killed, out of memory, machine restarted). Runs of other hosts cannot be checked from here and are left."""
        host = platform.node()

        def interrupted(tags: dict[str, str]) -> str | None:
            if tags.get("host.name") != host or "pid" not in tags:
                return None
            if same_process(int(tags["pid"]), tags.get("pid_started") or None):
                return None
            return (
                f"interrupted: the process that ran this job (pid {tags['pid']} on {host}) is gone; it was "
                f"killed or crashed before the run could end. Found by the next quantbench job on this store."
            )

        return end_orphaned_runs(self.client, self.experiment_id, interrupted, "Interrupted")

    @contextmanager
    def run(self, job_cfg: DictConfig, run_name: str, tags: dict[str, str], key: str) -> Iterator["Tracker"]:
        """Start a run tagged with its config hash `key`, with params and the config YAML; on an exception, end it
        FAILED with the reason."""
        resolved = OmegaConf.to_container(job_cfg, resolve=True)
        redact.remember_config(resolved)
        clean = redact.config(resolved)
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name) as active:
            self.run_id = active.info.run_id
            self.set_tags({**self.environment_tags(), **tags, "config_hash": key})
            self.log_params(flatten({k: v for k, v in clean.items() if k != "hydra"}))
            config_yaml = yaml.safe_dump(clean, default_flow_style=False, allow_unicode=True, sort_keys=False)
            mlflow.log_text(config_yaml, "config/config.yaml")  # as OmegaConf.to_yaml writes it, masked
            try:
                yield self
            except BaseException as exc:
                reason = redact.text(str(exc).strip() or type(exc).__name__)
                failure_type = getattr(exc, "failure_type", type(exc).__name__)  # children.Stopped: the signal
                try:
                    problem = unreachable(self.uri)  # a dead server is found in seconds, not after MLflow's retries
                    if problem is not None:
                        with contextlib.suppress(Exception), _one_quick_try():
                            mlflow.end_run(status="FAILED")  # forgets the run here, so that no more calls wait
                        raise ConnectionError(problem)
                    mlflow.set_tags({"failure_reason": reason[:5000], "failure_type": failure_type})
                    mlflow.log_text(redact.text("".join(traceback.format_exception(exc))), "failure/traceback.txt")
                    mlflow.end_run(status="FAILED")
                    exc.add_note(f"MLflow run {self.run_id} ended FAILED")
                except Exception as gone:  # the store itself is gone (a tracking server down): say so
                    exc.add_note(
                        f"MLflow run {self.run_id} could not be marked FAILED: the tracking store "
                        f"{redact.text(self.uri)} stopped answering ({type(gone).__name__}: "
                        f"{redact.text(str(gone))[:300]}). It stays RUNNING there until a later job on this host "
                        f"marks it FAILED (Interrupted)."
                    )
                raise

    environment_tags = staticmethod(environment_tags)  # where and what ran (host.py)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, redact.text(str(v))[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step)
            self.logged["metrics"].update(clean)

    def set_tags(self, tags: dict[str, Any]) -> None:
        clean = {k: redact.text(str(v)) for k, v in tags.items() if v is not None}
        mlflow.set_tags(clean)
        self.logged["tags"].update(clean)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(redact.text(json.dumps(obj, indent=2, default=str)))
            mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)
        self.logged["artifacts"].add(artifact_file)

    def mark(self) -> dict[str, set[str]]:
        """What has been logged so far, to tell a stage's own outputs by `since`."""
        return {kind: set(names) for kind, names in self.logged.items()}

    def since(self, mark: dict[str, set[str]]) -> dict[str, list[str]]:
        """The metrics, tags and JSON artifacts logged after `mark`, by name."""
        return {kind: sorted(names - mark[kind]) for kind, names in self.logged.items()}

    def read_json(self, run_id: str, artifact_file: str) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(self.client.download_artifacts(run_id, artifact_file, tmp)).read_text())

    def copy_outputs(self, source, outputs: dict[str, list[str]]) -> dict[str, float]:
        """Log into this run what `source` (an mlflow Run of this store) logged under the names `outputs` lists:
        every metric with its history (steps included), the tags, the JSON artifacts. Everything is read before
        anything is logged, so a source that cannot be read leaves this run as it was (the error is raised)."""
        from mlflow.entities import Metric

        run_id = source.info.run_id
        missing = [name for name in outputs["metrics"] if name not in source.data.metrics]
        if missing:
            raise KeyError(f"run {run_id} has no metric(s) {missing}")
        history = [m for name in outputs["metrics"] for m in self.client.get_metric_history(run_id, name)]
        tags = {name: source.data.tags[name] for name in outputs["tags"]}
        artifacts = {name: self.read_json(run_id, name) for name in outputs["artifacts"]}
        now = int(time.time() * 1000)
        batch = [Metric(m.key, m.value, now, m.step) for m in history]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        self.logged["metrics"].update(outputs["metrics"])
        self.set_tags(tags)
        for name, obj in artifacts.items():
            self.log_json(obj, name)
        return {name: source.data.metrics[name] for name in outputs["metrics"]}

    def log_folder(self, folder: str | Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(folder), artifact_path)

    def log_model(self, folder: Path, mode: str) -> str | None:
        """The model folder per tracking.log_model, as the run's MLflow logged model (tracking/logged_model.py):
        its files copied into it, or referenced by location beside their sha256s (logged by the job either way, so
        whoever loads it can check it is what was measured). Call it last: the run's metrics are linked to the
        model as they are then. The logged model's id, or None for `none`."""
        if mode == "none":
            return None
        if mode == "reference":
            self.set_tags({MODEL_LOCATION_TAG: folder.resolve().as_uri()})
        sha256 = self.read_json(self.run_id, measure.MODEL_SHA256) if mode == "reference" else {}
        model = logged_model.create(self.client, self.run_id, folder, mode, sha256)
        log.info("Logged the model as %s (%s, tracking.log_model=%s)", model.name, model.model_id, mode)
        return model.model_id
