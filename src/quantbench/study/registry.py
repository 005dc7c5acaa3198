"""`quantbench register` (`make register`): apply the selection policy (the `policy` config group,
quantbench.study.policy) to a sweep's runs and register the winner's saved model folder in the MLflow Model Registry
under the alias `champion`.

The folder is registered as the run's MLflow logged model (`models:/<model_id>`, quantbench.tracking.logged_model),
whose files are exactly what the quantizer saved: re-saving through an MLflow flavor corrupts some formats
(GPTQModel) and fails for others (bitsandbytes 4-bit). A model logged by reference is registered at its folder's
location, linked to its logged model. Registering the same run again adds no version; it only moves the alias back
to it and refreshes the tags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.study.policy import MEAN_ACCURACY, Decision, decide, load_policy, metric
from quantbench.study.runs import RunRow, Selection, Store, add_store_args
from quantbench.tracking import logged_model
from quantbench.tracking.writer import MODEL_LOCATION_TAG
from quantbench.upstream.mlflow_registry import global_uris

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # where runs logged before quantbench logged models have their model folder


def register(
    store: Store, sel: Selection, decision: Decision, policy: DictConfig
) -> tuple[ModelVersion, bool, str | None]:
    """Register the winner's model folder (idempotent per run and source) and point the alias at it.

    Returns the version, whether it was created now, and the version the alias pointed to before.
    """
    client, name, row = store.client, policy.registered_name, decision.row
    model, reference = verify_files(store, row)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description="Quantized models chosen by quantbench's selection policy "
            "(conf/policy). Load with models:/<name>@champion.",
        )
    # the logged model's own URI; a referenced folder's location (a tracking server takes a model_id only with
    # a source inside that model); a run logged before logged models, its artifact folder
    model_id = model.model_id if model and not reference else None
    source = reference or (f"models:/{model_id}" if model_id else f"{row.artifact_uri.rstrip('/')}/{MODEL_DIR}")
    same = [
        v for v in client.search_model_versions(f"name = '{name}' and run_id = '{row.run_id}'") if v.source == source
    ]
    created = not same
    if same:
        version = min(same, key=lambda v: int(v.version))
    else:
        with global_uris(store.uri):  # MLflow 3.17 looks a models:/<model_id> source up in the *global* store
            version = client.create_model_version(
                name,
                source=source,
                run_id=row.run_id,
                description=f"{row.label} from sweep {sel.sweep}: {decision.why}",
                model_id=model_id,
            )
        if model is not None:
            logged_model.note_version(client, model.model_id, name, version.version)
    try:
        previous: str | None = client.get_model_version_by_alias(name, policy.alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, policy.alias, version.version)
    for key, value in _version_tags(sel, decision, policy).items():
        client.set_model_version_tag(name, version.version, key, value)
    return version, created, previous


def verify_files(store: Store, row: RunRow) -> tuple[LoggedModel | None, str | None]:
    """Refuse to register a model folder whose files are not the ones the job measured (their sha256s, logged by the
    job beside the folder): a folder edited or truncated after the run would be registered under its numbers. A
    referenced folder (tracking.log_model=reference) is checked where it is: it must be reachable from here.
    Returns the run's logged model (None for a run logged before quantbench logged models) and the referenced
    folder's location (None unless tracking.log_model=reference)."""
    import json

    import mlflow

    model = logged_model.of_run(store.client, row.run_id)
    reference = row.tags.get(MODEL_LOCATION_TAG)  # tracking.log_model=reference: the folder stayed where it was made
    if model is None and reference is None and not store.client.list_artifacts(row.run_id, MODEL_DIR):
        raise ConfigError(
            f"Run {row.run_id} ({row.label}) logged no model (no logged model, no {MODEL_LOCATION_TAG}: "
            f"was tracking.log_model=none?); nothing to register."
        )
    with tempfile.TemporaryDirectory(prefix="quantbench-verify-") as tmp:
        try:
            record = mlflow.artifacts.download_artifacts(
                run_id=row.run_id, artifact_path=measure.MODEL_SHA256, dst_path=tmp, tracking_uri=store.uri
            )
        except (MlflowException, OSError) as exc:
            raise ConfigError(
                f"Run {row.run_id} ({row.label}) has no {measure.MODEL_SHA256} (runs logged before quantbench "
                f"recorded file hashes have none), so its model folder cannot be checked; rerun the job "
                f"with force=true. ({type(exc).__name__})"
            ) from exc
        expected = json.loads(Path(record).read_text())
        if reference is not None:
            folder = url2pathname(urlparse(reference).path)
            if not Path(folder).is_dir():
                raise ConfigError(
                    f"Run {row.run_id} ({row.label}) logged its model by reference, {reference}, which is not a "
                    f"folder on this machine: register from a machine that shares that storage."
                )
        elif model is not None:
            folder = logged_model.download(model, Path(tmp) / "files", store.uri)
        else:
            folder = mlflow.artifacts.download_artifacts(
                run_id=row.run_id, artifact_path=MODEL_DIR, dst_path=str(Path(tmp) / "files"), tracking_uri=store.uri
            )
        wrong = measure.changed_files(folder, expected)
    if wrong:
        raise ConfigError(
            f"Run {row.run_id} ({row.label}): its logged model folder is not what the job measured — "
            f"{', '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''} (sha256 against {measure.MODEL_SHA256}). "
            f"Nothing registered; rerun the job with force=true."
        )
    return model, reference


def _version_tags(sel: Selection, decision: Decision, policy: DictConfig) -> dict[str, str]:
    row = decision.row
    tags = {
        "method": row.method,
        "experiment": sel.experiment,
        "sweep_id": sel.sweep,
        "why": decision.why[:4000],
        "policy": OmegaConf.to_yaml(policy)[:4000],
    }
    tags |= {f"policy.{k}": str(v) for k, v in OmegaConf.to_container(policy).items()}
    won = {"mean_accuracy": metric(row, MEAN_ACCURACY, sel.tasks), policy.rank_by.replace(" ", "_"): decision.score}
    if policy.tie_break:
        won[policy.tie_break] = decision.tie_value
    for name in (
        "disk_gb",
        "weight_gb",
        "bits_per_weight",
        "peak_mem_gb",
        "tokens_per_s_1_stream",
        "tokens_per_s_8_streams",
        *(f"{t}_acc" for t in sel.tasks),
    ):
        won.setdefault(name, row.metrics.get(name))
    tags |= {f"metric.{k}": f"{v:.6g}" for k, v in won.items() if v is not None}
    return tags


def load_champion(store: Store, name: str, alias: str = "champion", dst: str | Path | None = None) -> Path:
    """Download models:/<name>@<alias> to a folder transformers can load."""
    import mlflow

    dst = Path(dst or tempfile.mkdtemp(prefix="quantbench-champion-"))
    # MLflow 3.17 resolves the alias with the *global* registry URI, whatever download_artifacts is passed.
    with global_uris(store.uri):
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(dst)))


def smoke_generate(folder: Path, prompt: str = "Where does", new_tokens: int = 8) -> str:
    """Load the folder with transformers and generate a few tokens: proof the registered model is usable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench register", description=__doc__.split("\n\n")[0])
    add_store_args(p)

    p.add_argument("--dry-run", action="store_true", help="print the decision, register nothing")
    p.add_argument("--verify", action="store_true", help="load models:/<name>@<alias> back and generate with it")
    p.add_argument(
        "overrides",
        nargs="*",
        help="the policy, Hydra style: policy=<name> picks conf/policy/<name>.yaml (default: default); key=value or "
        "policy.key=value sets one of its keys (e.g. max_disk_gb=5)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        policy = load_policy(args.overrides)
    except ConfigError as exc:  # bad input: the paragraph, not a traceback
        log.error("%s", exc)
        return 2
    baseline = policy.baseline if args.baseline == p.get_default("baseline") else args.baseline
    try:
        return _decide_and_register(args, policy, baseline)
    except ConfigError as exc:  # no such experiment or sweep, a folder that fails its check: the paragraph, exit 1
        print(exc, file=sys.stderr)
        return 1


def _decide_and_register(args: argparse.Namespace, policy: DictConfig, baseline: str) -> int:
    store = Store(args.tracking_uri)
    sel = store.select(args.experiment, args.sweep, args.filter, baseline)
    decisions = decide(sel, store.compare(sel), policy)
    log.info("Policy (%s): %s", " ".join(args.overrides) or "policy=default", OmegaConf.to_container(policy))
    log.info(
        "Experiment %s, sweep %s, baseline %s%s",
        sel.experiment,
        sel.sweep,
        sel.baseline.run_id if sel.baseline else "none",
        f" ({sel.baseline_note})" if sel.baseline_note else "",
    )
    for d in sorted(decisions, key=lambda d: not d.won):
        log.info("%-4s %s (run %s): %s", "WON" if d.won else "LOST", d.row.label, d.row.run_id or "none", d.why)
    winner = next((d for d in decisions if d.won), None)
    if winner is None:
        log.error("No run satisfies the policy; nothing registered.")
        return 1
    if policy.registered_name is None:  # one entry per model: the seed study's winner is not filed under the tiny one
        policy.registered_name = f"quantbench-{winner.row.tags.get('model', 'model')}"
    log.info("Registered model name: %s", policy.registered_name)
    if args.dry_run:
        return 0
    version, created, previous = register(store, sel, winner, policy)
    log.info(
        "%s %s version %s (source %s); alias %s: %s -> %s",
        "Registered" if created else "Already registered:",
        policy.registered_name,
        version.version,
        version.source,
        policy.alias,
        previous or "none",
        version.version,
    )
    if args.verify:
        with tempfile.TemporaryDirectory(prefix="quantbench-champion-") as tmp:
            folder = load_champion(store, policy.registered_name, policy.alias, tmp)
            log.info(
                "models:/%s@%s loads from %s and generates: %r",
                policy.registered_name,
                policy.alias,
                version.source,
                smoke_generate(folder),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
