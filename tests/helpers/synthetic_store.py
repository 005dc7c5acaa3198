"""Fill a real (temporary, SQLite) MLflow store with synthetic quantbench runs: the report, registry and
recommend tests read them back exactly as they read a sweep's runs, without quantizing anything."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from quantbench import measure
from quantbench.tracking import logged_model

EXPERIMENT = "quantbench-tiny"


def make_store(root: Path) -> tuple[str, MlflowClient, str]:
    """A fresh store under `root`: (uri, client, experiment_id), artifacts in root/artifacts."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").resolve().as_uri())
    return uri, client, exp_id


def correctness(n: int, n_correct: int, flips_down: int = 0, flips_up: int = 0) -> list[int]:
    """0/1 per document: the first n_correct right, then `flips_down` of those wrong and `flips_up` of the
    wrong ones right — a candidate that differs from the baseline on exactly those documents."""
    acc = [1] * n_correct + [0] * (n - n_correct)
    for i in range(flips_down):
        acc[i] = 0
    for i in range(flips_up):
        acc[n_correct + i] = 1
    return acc


def log_run(
    client: MlflowClient,
    exp_id: str,
    method: str,
    *,
    sweep: str = "s1",
    samples: dict[str, list[int]] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    status: str = "FINISHED",
    failure_reason: str | None = None,
    model_dir: Path | None = None,
    model_by_reference: bool = False,
    legacy_model_folder: bool = False,
    job_num: int = 0,
    sweep_dir: Path | None = None,
    tasks: list[str] | None = None,
    quality_windows: dict[str, list[float]] | None = None,
) -> str:
    """One run shaped like pipeline.run's: tags, params, accuracy metrics + stderr from `samples`, samples.json."""
    run_tags = {
        "method": method,
        "model": "tiny",
        "eval": "tiny",
        "hardware": "cpu",
        "sweep_id": sweep,
        "job_num": str(job_num),
        "quant_library": "transformers",
        "version.transformers": "5.17.0",
        "version.torch": "2.13.0",
        **(tags or {}),
    }
    if sweep_dir is not None:
        run_tags["sweep_dir"] = str(sweep_dir)
    if failure_reason:
        run_tags["failure_reason"] = failure_reason
    run = client.create_run(exp_id, run_name=f"{method}-tiny", tags=run_tags)
    rid = run.info.run_id
    client.log_param(rid, "method.name", method)
    client.log_param(rid, "eval.tasks", json.dumps(tasks or sorted(samples or {})))
    client.log_param(rid, "repeats", "1")
    client.log_param(rid, "hardware.device", "cpu")
    client.log_param(rid, "bench.prompt_tokens", "100")
    client.log_param(rid, "bench.output_tokens", "250")
    values = dict(metrics or {})
    for task, acc in (samples or {}).items():
        p, n = sum(acc) / len(acc), len(acc)
        values[f"{task}_acc"] = p
        values[f"{task}_acc_stderr"] = math.sqrt(p * (1 - p) / (n - 1))
    for key, value in values.items():
        client.log_metric(rid, key, value)
    if samples:
        client.log_dict(
            rid,
            {t: [{"doc_id": i, "acc": float(a)} for i, a in enumerate(acc)] for t, acc in samples.items()},
            "eval/samples.json",
        )
    if quality_windows:
        client.log_dict(rid, quality_windows, "quality/per_window.json")
    if model_dir is not None:
        sha256 = measure.file_sha256(model_dir)
        with tempfile.TemporaryDirectory() as tmp:  # as the pipeline does: the folder's sha256s in the run
            (Path(tmp) / "model_sha256.json").write_text(json.dumps(sha256))
            client.log_artifact(rid, str(Path(tmp) / "model_sha256.json"))
        if legacy_model_folder:  # as quantbench logged it before MLflow 3 logged models: a plain artifact folder
            client.log_artifacts(rid, str(model_dir), "model")
        else:  # as Tracker.log_model does: the run's logged model, its files or (reference) their location
            if model_by_reference:
                client.set_tag(rid, "model_location", model_dir.resolve().as_uri())
            logged_model.create(client, rid, model_dir, "reference" if model_by_reference else "copy", sha256)
    client.set_terminated(rid, status)
    return rid


def tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random hidden-64 Llama with the embedded tokenizer: small, real, loadable, generates."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantbench.embedded import tiny

    tokenizer = tiny.build_tokenizer(tiny.World.generate(tiny.TinyRecipe()))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
