"""A job's quantized model as an MLflow 3 logged model, so that MLflow's own views list it: the runs page's Models
column and the experiment's Models tab (with the run's metrics and the method's params), and registry versions that
link to it.

tracking.log_model=copy: the model folder's files are the logged model's artifacts, stored once (not also under
the run's artifacts). reference: the files stay where the job wrote them; the logged model carries their location
(tag `model_location`) and their sha256s (its artifact `model_sha256.json`). none: no logged model.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient

from quantbench import measure

log = logging.getLogger(__name__)

LOCATION_TAG = "model_location"  # tracking.log_model=reference: where the model folder is (a file:// URI)
MODE_TAG = "log_model"  # on the logged model: copy or reference
# the run's params that describe the model (the rest describe the job: eval, bench, paths)
PARAM_PREFIXES = ("method.", "model.", "calibration.")
# the run's tags worth seeing and filtering on in the Models tab
RUN_TAGS = ("method", "model", "quant_format", "quant_library", "weights", "sweep_id", "config_hash")


def create(client: MlflowClient, run_id: str, folder: Path, mode: str, sha256: dict[str, str]) -> LoggedModel:
    """Log `folder` as the run's logged model (mode copy or reference), READY once its files or record are stored
    and the run's metrics are linked to it; FAILED (and the error raised) if any of that fails. Call it after the
    run's last metric: the metrics linked are those the run has then."""
    if not folder.is_dir():  # MLflow would log an empty model
        raise FileNotFoundError(f"The model folder {folder} is not there: nothing to log as the run's model")
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=re.sub(r"[/:.%\"']", "_", run.info.run_name or "model"),  # MLflow refuses these in a model's name
        source_run_id=run_id,
        tags={k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags} | {MODE_TAG: mode},
        params={k: v for k, v in run.data.params.items() if k.startswith(PARAM_PREFIXES)},
        model_type="quantized-llm",
    )
    try:
        if mode == "copy":
            client.log_model_artifacts(model.model_id, str(folder))
        else:
            client.set_logged_model_tags(model.model_id, {LOCATION_TAG: folder.resolve().as_uri()})
            with tempfile.TemporaryDirectory() as tmp:
                record = Path(tmp) / measure.MODEL_SHA256
                record.write_text(json.dumps(sha256, indent=2))
                client.log_model_artifact(model.model_id, str(record))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])  # the runs page's Models column
        _link_metrics(client, run, model.model_id)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        except Exception as exc:  # the store is gone: the job's own error matters more
            log.warning("Could not mark logged model %s FAILED: %s", model.model_id, exc)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _link_metrics(client: MlflowClient, run, model_id: str) -> None:
    """Every metric value of the run linked to the model, as MLflow's own log_model does: the same key, value,
    timestamp and step, so the run keeps one copy of each and the model gets its own."""
    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run.info.run_id)
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    ]
    for i in range(0, len(linked), 1000):  # MLflow's limit per batch
        client.log_batch(run.info.run_id, metrics=linked[i : i + 1000])


def of_run(client: MlflowClient, run_id: str) -> LoggedModel | None:
    """The run's READY logged model (its newest, if several), or None: a run logged with tracking.log_model=none,
    or before quantbench logged models."""
    outputs = client.get_run(run_id).outputs
    models = [client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])]
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp) if ready else None


def fail_pending(client: MlflowClient, experiment_id: str, run_id: str) -> list[str]:
    """Mark FAILED the run's logged models still PENDING: its job was killed while storing them (`create` marks its
    own failures), and a PENDING model would sit in the Models tab as if it were on its way. The ids marked."""
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    pending = [m for m in found if m.status == LoggedModelStatus.PENDING]  # MLflow 3.17's status filter matches none
    for model in pending:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return [m.model_id for m in pending]


def note_version(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Tell the logged model it is registered as `name` version `version`, as mlflow.register_model does (the tag
    mlflow.modelVersions): the Models tab then links the model to its registry versions. (MLflow 3.17's own
    registry store keeps no model_id on a version; a `models:/<model_id>` source is the other half of the link.)"""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": str(version)}
    if entry not in listed:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [entry])})


def download(model: LoggedModel, dst: str | Path, tracking_uri: str) -> Path:
    """The logged model's artifacts (copy: the model folder itself) in `dst`."""
    import mlflow

    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location, dst_path=str(dst), tracking_uri=tracking_uri
        )
    )
