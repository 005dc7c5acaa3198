"""Accuracy through lm-evaluation-harness, on the model already in memory (no reload, no second copy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.models import EMBEDDED_PREFIX, embedded_root

log = logging.getLogger(__name__)


@dataclass
class EvalPlan:
    tasks: list[str]
    include_path: str | None  # a folder of local task YAMLs, or None for lm-eval's built-in tasks
    num_fewshot: int
    batch_size: int
    limit: int | float | None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    results: dict  # lm-eval's results JSON, samples removed
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task -> [{doc_id, acc}], for paired tests


def plan(eval_cfg: DictConfig, cache_dir: str | Path) -> EvalPlan | None:
    """Check the task names exist (indexing only the task folders needed) before any model is loaded."""
    tasks = list(eval_cfg.tasks or [])
    if not tasks:
        return None
    include = eval_cfg.get("include_path")
    if include and str(include).startswith(EMBEDDED_PREFIX):
        include = str(embedded_root(str(include), cache_dir) / "tasks")
    elif include and not Path(include).is_dir():
        raise ConfigError(f"eval.include_path={include!r}: no such folder of lm-eval task YAMLs.")
    manager = task_manager(include)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hint = sorted(known)[:20] if include else "run `lm-eval ls tasks` for the full list"
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}. Known tasks here: {hint}.")
    if int(eval_cfg.batch_size) < 1:
        raise ConfigError(f"eval.batch_size={eval_cfg.batch_size}: must be a positive integer.")
    return EvalPlan(
        tasks=tasks,
        include_path=include,
        num_fewshot=int(eval_cfg.num_fewshot),
        batch_size=int(eval_cfg.batch_size),
        limit=eval_cfg.get("limit"),
    )


def task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    # A local folder alone: indexing lm-eval's ~14,000 built-in tasks takes longer than evaluating the tiny model.
    return TaskManager(include_path=include_path, include_defaults=include_path is None)


def evaluate(model, tokenizer, eval_plan: EvalPlan, seed: int = 0) -> EvalResult:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_plan.batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=eval_plan.tasks,
        num_fewshot=eval_plan.num_fewshot,
        limit=eval_plan.limit,
        task_manager=task_manager(eval_plan.include_path),
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    metrics: dict[str, float] = {}
    for task in eval_plan.tasks:
        for key, value in out["results"].get(task, {}).items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
                metrics[f"{task}_{metric}"] = float(value)
    samples = {
        task: [{"doc_id": s["doc_id"], "acc": float(s["acc"])} for s in rows if "acc" in s]
        for task, rows in (out.get("samples") or {}).items()
    }
    results = {k: v for k, v in out.items() if k != "samples"}
    return EvalResult(metrics=metrics, results=results, samples=samples)
