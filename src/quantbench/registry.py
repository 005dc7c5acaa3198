"""`make register`: apply a declared selection policy (conf/policy/*.yaml) to a sweep's runs and register the
winner's saved model folder in the MLflow Model Registry under the alias `champion`.

The folder is registered by its artifact URI, exactly as the quantizer saved it: re-saving through an MLflow
flavor corrupts some formats (GPTQModel) and fails for others (bitsandbytes 4-bit). Registering the same run
again adds no version; it only moves the alias back to it and refreshes the tags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from quantbench import measure, recommend
from quantbench.runs import ROOT, RunRow, Selection, Store, add_store_args, speed_groups

log = logging.getLogger(__name__)

DEFAULT_POLICY = ROOT / "conf" / "policy" / "default.yaml"
MEAN_ACCURACY = "mean accuracy"
MODEL_DIR = "model"


@dataclass
class Policy:
    """The keys a policy file may set (unknown keys are an error: a typo must not silently relax a rule)."""

    registered_name: str = "quantbench-tiny"
    alias: str = "champion"
    baseline: str = "fp16"
    max_disk_gb: float | None = None
    max_serve_mem_gb: float | None = None  # what serving took (the vLLM engine's GPU memory, or the bench's RSS)
    max_peak_mem_gb: float | None = None  # the maximum over quantize, eval and bench (quantizing may need far more)
    min_tokens_per_s_1_stream: float | None = None
    max_kl_mean: float | None = None  # quality_kl_mean: nats per token from the baseline's next-token distribution
    max_acc_drop_points: float | None = 2.0
    reject_significantly_worse: bool = False
    rank_by: str = MEAN_ACCURACY
    tie_tolerance: float = 0.5
    tie_break: str | None = "tokens_per_s_1_stream"
    rank_across_backends: bool = False  # let a speed metric rank runs benchmarked by different backends or machines


@dataclass
class Decision:
    """What the policy made of one run."""

    row: RunRow
    rejected: list[str] = field(default_factory=list)
    score: float | None = None
    tie_value: float | None = None
    won: bool = False
    why: str = ""


def load_policy(path: str | Path = DEFAULT_POLICY, overrides: list[str] | None = None) -> DictConfig:
    """The policy file merged over the schema, then key=value overrides; types and key names are checked."""
    cfg = OmegaConf.merge(OmegaConf.structured(Policy), OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
    if str(cfg.rank_by).replace("_", " ") == MEAN_ACCURACY:
        cfg.rank_by = MEAN_ACCURACY
    return cfg


def metric(row: RunRow, name: str | None, tasks: list[str]) -> float | None:
    """A run's value for a policy metric; "mean accuracy" is in percent so that tolerances are in points."""
    if name is None:
        return None
    if name.replace("_", " ") == MEAN_ACCURACY:
        acc = row.mean_acc(tasks)
        return None if acc is None else 100 * acc
    return row.metrics.get(name)


def higher_is_better(name: str) -> bool:
    """Sizes, times, KL divergence and perplexity are better small; accuracy, throughput and agreement big."""
    lowered = name.replace(" ", "_")
    return not (
        lowered.endswith("_gb")
        or lowered.startswith("ttft")
        or lowered.startswith(("quality_kl", "quality_ppl"))
        or (lowered.endswith("_s") and not lowered.startswith(("tokens_per_s", "decode_tokens_per_s")))
    )


def is_speed(name: str | None) -> bool:
    """Metrics that measure the benchmark backend as much as the model."""
    return bool(name) and name.replace(" ", "_").startswith(
        ("tokens_per_s", "decode_tokens_per_s", "ttft", "roofline", "vllm_engine_start")
    )


def decide(sel: Selection, comparisons: recommend.Comparisons, policy: DictConfig) -> list[Decision]:
    """Reject, rank, break ties; every Decision says why its run won or lost."""
    decisions = [Decision(r) for r in sel.rows]
    for d in decisions:
        d.rejected = _rejections(d.row, sel, comparisons, policy)
        d.score = metric(d.row, policy.rank_by, sel.tasks)
        d.tie_value = metric(d.row, policy.tie_break, sel.tasks)
        if not d.rejected and d.score is None:
            d.rejected.append(f"has no {policy.rank_by} to rank by")
    candidates = [d for d in decisions if not d.rejected]
    if not candidates:
        return decisions
    up_rank = 1 if higher_is_better(policy.rank_by) else -1
    up_tie = 1 if policy.tie_break is None or higher_is_better(policy.tie_break) else -1
    best = max(up_rank * d.score for d in candidates)
    tied = [d for d in candidates if best - up_rank * d.score <= policy.tie_tolerance]
    for name, compared in ((policy.rank_by, candidates), (policy.tie_break, tied if len(tied) > 1 else [])):
        groups = speed_groups(d.row for d in compared)
        if is_speed(name) and len(groups) > 1 and not policy.rank_across_backends:
            reason = (
                f"{name} would rank runs benchmarked by different backends or machines ("
                + "; ".join(f"{basis}: {', '.join(r.label for r in rows)}" for basis, rows in groups.items())
                + "), which measures the backend as much as the model; choose runs of one backend "
                "(e.g. a sweep with one bench.backend), or set rank_across_backends=true"
            )
            for d in compared:
                d.rejected.append(reason)
                d.why = "rejected: " + "; ".join(d.rejected)
            return decisions
    tied.sort(key=lambda d: (d.tie_value is None, -up_tie * (d.tie_value or 0.0), -up_rank * d.score))
    winner = tied[0]
    winner.won = True
    best_score = up_rank * best
    rank, tie = policy.rank_by, policy.tie_break
    if len(tied) == 1:
        winner.why = f"best {rank}: {_v(winner.score)}"
    else:
        winner.why = (
            f"{rank} {_v(winner.score)} within {policy.tie_tolerance:g} of the best ({_v(best_score)}), "
            f"and best {tie} among the {len(tied)} tied: {_v(winner.tie_value)}"
        )
    for d in candidates:
        if d is winner:
            continue
        if d in tied:
            d.why = (
                f"tied on {rank} ({_v(d.score)} vs best {_v(best_score)}, within {policy.tie_tolerance:g}) "
                f"but lost the tie-break on {tie}: {_v(d.tie_value)} vs {_v(winner.tie_value)}"
            )
        else:
            d.why = (
                f"{rank} {_v(d.score)} is more than {policy.tie_tolerance:g} "
                f"{'below' if up_rank > 0 else 'above'} the best ({_v(best_score)})"
            )
    for d in decisions:
        if d.rejected:
            d.why = "rejected: " + "; ".join(d.rejected)
    return decisions


def _rejections(row: RunRow, sel: Selection, comparisons: recommend.Comparisons, policy: DictConfig) -> list[str]:
    if not row.ok:
        return [row.short_status()]
    out = []
    limits = [
        ("disk_gb", policy.max_disk_gb, "max"),
        ("serve_mem_gb", policy.max_serve_mem_gb, "max"),
        ("peak_mem_gb", policy.max_peak_mem_gb, "max"),
        ("tokens_per_s_1_stream", policy.min_tokens_per_s_1_stream, "min"),
        ("quality_kl_mean", policy.max_kl_mean, "max"),
    ]
    for name, limit, kind in limits:
        if limit is None:
            continue
        value = row.metrics.get(name)
        if value is None:
            out.append(f"no {name} to check against {kind} {limit:g}")
        elif (value > limit) if kind == "max" else (value < limit):
            out.append(f"{name} {value:.4g} {'>' if kind == 'max' else '<'} {kind} {limit:g}")
    if policy.max_acc_drop_points is not None:
        base = sel.baseline
        if base is None:
            out.append(f"cannot check the accuracy drop: no finished {sel.baseline_method} baseline")
        else:
            for task in sel.tasks:
                acc, ref = row.acc(task), base.acc(task)
                if acc is None or ref is None:
                    out.append(f"no {task} accuracy to compare with the baseline")
                elif 100 * (ref - acc) > policy.max_acc_drop_points:
                    out.append(
                        f"{task} drops {100 * (ref - acc):.2f} pp vs {sel.baseline_method} "
                        f"> max {policy.max_acc_drop_points:g}"
                    )
    if policy.reject_significantly_worse:
        worse = recommend.worse_tasks(row, comparisons)
        if worse:
            out.append("significantly worse than the baseline on " + "; ".join(worse))
    return out


def register(
    store: Store, sel: Selection, decision: Decision, policy: DictConfig
) -> tuple[ModelVersion, bool, str | None]:
    """Register the winner's model folder (idempotent per run and source) and point the alias at it.

    Returns the version, whether it was created now, and the version the alias pointed to before.
    """
    client, name, row = store.client, policy.registered_name, decision.row
    if not client.list_artifacts(row.run_id, MODEL_DIR):
        raise SystemExit(
            f"Run {row.run_id} ({row.label}) won but logged no '{MODEL_DIR}/' folder "
            f"(was tracking.log_model=false?); nothing to register."
        )
    verify_files(store, row)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description="Quantized models chosen by quantbench's selection policy "
            "(conf/policy). Load with models:/<name>@champion.",
        )
    source = f"{row.artifact_uri.rstrip('/')}/{MODEL_DIR}"
    same = [
        v for v in client.search_model_versions(f"name = '{name}' and run_id = '{row.run_id}'") if v.source == source
    ]
    created = not same
    if same:
        version = min(same, key=lambda v: int(v.version))
    else:
        version = client.create_model_version(
            name, source=source, run_id=row.run_id, description=f"{row.label} from sweep {sel.sweep}: {decision.why}"
        )
    try:
        previous: str | None = client.get_model_version_by_alias(name, policy.alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, policy.alias, version.version)
    for key, value in _version_tags(sel, decision, policy).items():
        client.set_model_version_tag(name, version.version, key, value)
    return version, created, previous


def verify_files(store: Store, row: RunRow) -> None:
    """Refuse to register a model folder whose files are not the ones the job measured (their sha256s, logged by the
    job beside the folder): a folder edited or truncated after the run would be registered under its numbers."""
    import json

    import mlflow

    with tempfile.TemporaryDirectory(prefix="quantbench-verify-") as tmp:
        try:
            record = mlflow.artifacts.download_artifacts(
                run_id=row.run_id, artifact_path=measure.MODEL_SHA256, dst_path=tmp, tracking_uri=store.uri
            )
        except (MlflowException, OSError) as exc:
            raise SystemExit(
                f"Run {row.run_id} ({row.label}) has no {measure.MODEL_SHA256} (runs logged before quantbench "
                f"recorded file hashes have none), so its model folder cannot be checked; rerun the job "
                f"with force=true. ({type(exc).__name__})"
            ) from exc
        expected = json.loads(Path(record).read_text())
        folder = mlflow.artifacts.download_artifacts(
            run_id=row.run_id, artifact_path=MODEL_DIR, dst_path=str(Path(tmp) / "files"), tracking_uri=store.uri
        )
        wrong = measure.changed_files(folder, expected)
    if wrong:
        raise SystemExit(
            f"Run {row.run_id} ({row.label}): its logged model folder is not what the job measured — "
            f"{', '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''} (sha256 against {measure.MODEL_SHA256}). "
            f"Nothing registered; rerun the job with force=true."
        )


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


def _v(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def load_champion(store: Store, name: str, alias: str = "champion", dst: str | Path | None = None) -> Path:
    """Download models:/<name>@<alias> to a folder transformers can load."""
    import mlflow

    dst = Path(dst or tempfile.mkdtemp(prefix="quantbench-champion-"))
    # MLflow 3.17 resolves the alias with the *global* registry URI, whatever download_artifacts is passed.
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(dst)))
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


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
    p = argparse.ArgumentParser(prog="python -m quantbench.registry", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--policy", default=str(DEFAULT_POLICY), help="policy YAML (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the decision, register nothing")
    p.add_argument("--verify", action="store_true", help="load models:/<name>@<alias> back and generate with it")
    p.add_argument("overrides", nargs="*", help="policy overrides, key=value (e.g. max_disk_gb=5)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    policy = load_policy(args.policy, args.overrides)
    baseline = policy.baseline if args.baseline == p.get_default("baseline") else args.baseline
    store = Store(args.tracking_uri)
    sel = store.select(args.experiment, args.sweep, args.filter, baseline)
    decisions = decide(sel, store.compare(sel), policy)
    log.info("Policy %s: %s", args.policy, OmegaConf.to_container(policy))
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
