"""Accuracy through lm-evaluation-harness, on the model already in memory (no reload, no second copy).

quantbench compares runs by accuracy (`acc`: the fraction of documents answered right, one 0/1 per document, which
the paired tests resample), so every name in `eval.tasks` must yield one: a task that scores `acc`, or a group
whose aggregate lm-eval computes for `acc` (lm-eval's `mmlu`: the 57 subjects' accuracy weighted by their size).
Anything else (an exact-match or perplexity task, a tag, which lm-eval reports task by task and never under its own
name) is refused before any model loads. Every numeric metric lm-eval reports for a requested name is logged under
its real name (`arc_challenge_acc`, `arc_challenge_acc_norm`, `mmlu_acc`, each with `_stderr`); a group's subtasks
and subgroups go to the `eval/per_task.json` artifact.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from quantbench.names import PER_TASK, RESULTS, SAMPLES  # noqa: F401  (evaluation.SAMPLES etc.)
from quantbench.errors import ConfigError
from quantbench.job.models import EMBEDDED_PREFIX, embedded_root

log = logging.getLogger(__name__)

ACCURACY = "acc"  # the metric every requested task or group must report
PER_DOC = ("acc", "acc_norm")  # per-document scores kept in eval/samples.json for the paired tests


@dataclass
class EvalPlan:
    tasks: list[str]
    include_path: str | None  # a folder of local task YAMLs, or None for lm-eval's built-in tasks
    num_fewshot: int
    batch_size: int
    limit: int | float | None  # documents per task (int), or a fraction of them (float below 1)
    # requested groups -> whether their accuracy is the size-weighted mean over all their documents at every level
    # (then paired tests may resample the documents of the whole group; otherwise they use the two standard errors)
    groups: dict[str, bool] = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    results: dict  # lm-eval's results JSON, samples removed
    samples: dict[str, list[dict]] = field(default_factory=dict)  # name -> [{task?, doc_id, acc}], for paired tests
    per_task: dict = field(default_factory=dict)  # every task and group scored, subtasks included


def plan(eval_cfg: DictConfig, cache_dir: str | Path) -> EvalPlan | None:
    """Check the task names exist and report an accuracy (indexing only the task folders needed), before any model
    is loaded."""
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
    index = manager.task_index
    problems = [p for t in tasks if (p := _accuracy_problem(t, index))]
    if problems:
        raise ConfigError(
            "eval.tasks: quantbench compares runs by accuracy (lm-eval's `acc`), which these do not report: "
            + "; ".join(problems)
            + ". Choose multiple-choice tasks, or groups that aggregate `acc`."
        )
    owners: dict[str, str] = {}
    for name in tasks:
        for leaf in sorted(_tasks_under(name, index)):
            if owners.setdefault(leaf, name) != name:
                raise ConfigError(
                    f"eval.tasks: the task {leaf!r} is part of both {owners[leaf]!r} and {name!r}; lm-eval scores a "
                    f"task once per run, so list it under one of them."
                )
    limit = eval_cfg.get("limit")
    return EvalPlan(
        tasks=tasks,
        include_path=include,
        num_fewshot=int(eval_cfg.num_fewshot),
        batch_size=int(eval_cfg.batch_size),
        limit=None if limit is None else int(limit) if limit >= 1 else float(limit),
        groups={t: _size_weighted(index[t].cfg, index) for t in tasks if _kind(index, t) == "GROUP"},
    )


def _kind(index: dict, name: str) -> str:
    return index[name].kind.name if name in index else "UNKNOWN"


def task_metrics(cfg: dict) -> list[str]:
    """The metrics a task's (include-resolved) YAML config scores: its metric_list, else its output type's defaults
    (lm-eval's DEFAULT_METRIC_REGISTRY; a task without output_type generates text)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    listed = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
    return [str(m) for m in listed] or DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), [])


def _accuracy_problem(name: str, index: dict) -> str | None:
    """Why `name` yields no accuracy quantbench can read, or None."""
    entry = index[name]
    kind = entry.kind.name
    if kind == "TAG":
        members = sorted(entry.tags)
        shown = ", ".join(members[:8]) + (f", ... ({len(members)} in all)" if len(members) > 8 else "")
        return (
            f"{name!r} is a tag, not a group: lm-eval scores its tasks ({shown}) one by one and reports nothing under "
            f"{name!r}; list the tasks you want"
        )
    if kind == "GROUP":
        aggregated = [m.get("metric") for m in entry.cfg.get("aggregate_metric_list") or [] if isinstance(m, dict)]
        if ACCURACY not in aggregated:
            return (
                f"the group {name!r} aggregates {aggregated or 'no metric'} (its aggregate_metric_list), not "
                f"{ACCURACY!r}: lm-eval reports no accuracy under {name!r}; list its tasks, or add an "
                f"aggregate_metric_list with `metric: acc`"
            )
        return None
    if kind == "TASK":
        metrics = task_metrics(entry.cfg)
        if ACCURACY not in metrics:
            return f"the task {name!r} scores {metrics or 'no metric'}, not {ACCURACY!r}"
        return None
    # a Python-defined task: its metrics are known once it is built, which may download its data; evaluate()
    # refuses to log a run without its accuracy
    return None


def _tasks_under(name: str, index: dict, depth: int = 0) -> set[str]:
    """The tasks lm-eval runs for `name`: itself, a tag's members, or a group's tasks through its subgroups."""
    entry = index.get(name)
    if entry is None or depth > 20 or entry.kind.name not in ("TAG", "GROUP"):
        return {name}
    if entry.kind.name == "TAG":
        return set(entry.tags)
    return _group_tasks(entry.cfg, index, depth)


def _group_tasks(cfg: dict, index: dict, depth: int) -> set[str]:
    out: set[str] = set()
    for sub in cfg.get("task") or []:
        if isinstance(sub, str):
            out |= _tasks_under(sub, index, depth + 1)
        elif isinstance(sub, dict) and "group" in sub:
            out |= _group_tasks(sub, index, depth + 1)
        elif isinstance(sub, dict) and "task" in sub:
            out.add(str(sub["task"]))
    return out


def _size_weighted(cfg: dict, index: dict, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a group's `acc` is the mean over every document of all its tasks: `weight_by_size` at its level and
    at each subgroup's (lm-eval's mmlu, mmlu_stem, ...). Then pairing documents across the whole group estimates
    the same difference as the logged accuracies'."""
    weighted = any(
        isinstance(m, dict) and m.get("metric") == ACCURACY and m.get("weight_by_size", False)
        for m in cfg.get("aggregate_metric_list") or []
    )
    if not weighted:
        return False
    for sub in cfg.get("task") or []:
        if isinstance(sub, dict) and "group" in sub:
            sub_cfg = sub
        elif isinstance(sub, str) and _kind(index, sub) == "GROUP" and sub not in seen:
            sub_cfg = index[sub].cfg
        else:
            continue
        if not _size_weighted(sub_cfg, index, seen | {str(cfg.get("group"))}):
            return False
    return True


def task_manager(include_path: str | None):
    """lm-eval's index of tasks, built once per process and folder (rebuilt if a file in the folder changes): each
    job asks for it twice (validate, eval), and a sweep's jobs share the Hydra process. Indexing lm-eval's 14,683
    built-in tasks takes 13 s on a 2-core AVX2 VM; the index is only read afterwards (each evaluation loads its tasks
    from it anew)."""
    stamp = None
    if include_path is not None:
        stamp = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in Path(include_path).rglob("*") if p.is_file()))
    return _task_manager(include_path, stamp)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, stamp: tuple | None):
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
    for name in eval_plan.tasks:
        found = named_metrics(out["results"].get(name, {}))
        if ACCURACY not in found:
            raise RuntimeError(
                f"lm-eval reported no {ACCURACY!r} for {name!r} (it reported {sorted(found) or 'nothing'}): "
                f"quantbench cannot compare this run's accuracy, so it is not logged as a result."
            )
        metrics |= {f"{name}_{metric}": value for metric, value in found.items()}
    samples_by_task = out.get("samples") or {}
    leaves = _leaves(out.get("group_subtasks") or {})
    samples = {}
    for name in eval_plan.tasks:
        if name in eval_plan.groups:
            if eval_plan.groups[name]:  # pairable over the whole group: each row says which subtask it is from
                samples[name] = [row | {"task": t} for t in leaves(name) for row in _per_doc(samples_by_task.get(t))]
        else:
            samples[name] = _per_doc(samples_by_task.get(name))
    per_task = {
        "requested": list(eval_plan.tasks),
        "group_subtasks": out.get("group_subtasks") or {},
        "results": {name: named_metrics(res) for name, res in out["results"].items()},
        "n_samples": out.get("n-samples") or {},
    }
    results = {k: v for k, v in out.items() if k != "samples"}
    return EvalResult(metrics=metrics, results=results, samples=samples, per_task=per_task)


def named_metrics(result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `metric,filter` keys as quantbench names them: `acc`, `acc_stderr`, `acc_norm` for the default
    filter ("none"), `<metric>_<filter>` for others (`exact_match_strict-match`); numbers only (a group's stderr can
    be "N/A")."""
    out = {}
    for key, value in result.items():
        metric, sep, filt = key.partition(",")
        if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return out


def _per_doc(rows: list[dict] | None) -> list[dict]:
    return [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in PER_DOC if m in s}} for s in rows or [] if "acc" in s]


def _leaves(group_subtasks: dict[str, list[str]]):
    """name -> the tasks under it, through every level of subgroups (a task is its own only leaf)."""

    def leaves(name: str) -> list[str]:
        if name not in group_subtasks:
            return [name]
        return [leaf for sub in group_subtasks[name] for leaf in leaves(sub)]

    return leaves
