"""The selection policy (the `policy` config group, conf/policy/*.yaml): which run of a sweep is the champion,
and why each other run is not. `registry` registers what it chooses.

1. Every run that is not FINISHED, or breaks a constraint (max_disk_gb, max_serve_mem_gb, max_peak_mem_gb,
   min_tokens_per_s_1_stream, max_kl_mean, max_acc_drop_points, reject_significantly_worse), is rejected with the
   reason.
2. The others are ranked by `rank_by`; runs within `tie_tolerance` of the best are tied, and `tie_break` decides.
   A speed metric ranks runs of one speed basis only (backend and version, machine and threads, benchmark shape),
   and a memory metric, limit or rank, runs whose figures measured the same thing (process RSS, CUDA's allocator,
   device memory), unless `rank_across_backends`. A metric logged as NaN passes no constraint and ranks nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from omegaconf import DictConfig

from quantbench import schema, stats
from quantbench.errors import ConfigError
from quantbench.paths import ROOT
from quantbench.runs import RunRow, Selection, mem_groups, speed_groups

MEAN_ACCURACY = "mean accuracy"


@dataclass
class Decision:
    """What the policy made of one run."""

    row: RunRow
    rejected: list[str] = field(default_factory=list)
    score: float | None = None
    tie_value: float | None = None
    won: bool = False
    why: str = ""


def load_policy(overrides: list[str] | None = None) -> DictConfig:
    """The `policy` config group composed by Hydra (conf/register.yaml: `policy: default` over its schema):
    `policy=<name>` picks conf/policy/<name>.yaml, `key=value` or `policy.key=value` sets a key. Hydra refuses an
    unknown key or a value of the wrong type (a typo must not silently relax a rule)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    schema.register()
    qualified = [
        o if o.split("=", 1)[0] == "policy" or o.startswith("policy.") else f"policy.{o}" for o in overrides or []
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        try:
            cfg = compose(config_name="register", overrides=qualified)
        except ConfigCompositionException as exc:
            cause = f" ({exc.__cause__})".replace("\n", " ") if exc.__cause__ else ""
            raise ConfigError(
                f"The policy refuses {' '.join(overrides or [])!r}: {exc}{cause}. Its keys: "
                f"{', '.join(f.name for f in fields(schema.PolicyConfig))}; its files: "
                f"{', '.join(sorted(p.stem for p in (ROOT / 'conf' / 'policy').glob('*.yaml')))}."
            ) from exc
    schema.check(cfg)  # ranges: a negative tie tolerance or a NaN limit would relax or break the rules silently
    policy = cfg.policy
    if str(policy.rank_by).replace("_", " ") == MEAN_ACCURACY:
        policy.rank_by = MEAN_ACCURACY
    for name in (policy.rank_by, policy.tie_break):
        if name is not None:
            higher_is_better(name)  # refuses a name that ranks nothing, before any run is read
    return policy


def metric(row: RunRow, name: str | None, tasks: list[str]) -> float | None:
    """A run's value for a policy metric; "mean accuracy" is in percent so that tolerances are in points."""
    if name is None:
        return None
    if name.replace("_", " ") == MEAN_ACCURACY:
        acc = row.mean_acc(tasks)
        return None if acc is None else 100 * acc
    return row.metrics.get(name)


# Which way a metric is better, by its name: what `rank_by` and `tie_break` may name. Anything else (a standard
# error, a bound, a count, the machine's bandwidth) measures no quality of the model and ranks nothing.
HIGHER_IS_BETTER = ("mean_accuracy", "tokens_per_s_", "decode_tokens_per_s_", "roofline_fraction_",
                    "quality_top1_agreement", "fingerprint_agreement")  # fmt: skip
HIGHER_SUFFIXES = ("_acc", "_acc_norm", "_acc_mean", "_acc_norm_mean")
LOWER_IS_BETTER = ("ttft_s_", "quality_kl_", "quality_ppl", "bits_per_weight", "fingerprint_nll",
                   "fingerprint_reload_nll")  # fmt: skip
LOWER_SUFFIXES = ("_gb", "_s", "_acc_std")
NOT_RANKABLE = ("_stderr", "roofline_tokens_per_s_", "memory_bandwidth_gbs", "quality_tokens", "acc_repeats")


def higher_is_better(name: str) -> bool:
    """Accuracy, throughput, agreement: better big. Sizes, times, bits per weight, KL divergence, perplexity and
    the fingerprint's loss: better small. Raises ConfigError for a name that ranks nothing (a standard error, a
    bandwidth bound, a count) or is not a metric quantbench logs."""
    lowered = name.replace(" ", "_")
    if any(p in lowered for p in NOT_RANKABLE):
        raise ConfigError(
            f"{name!r} does not rank models (a standard error, a bound or a count measures the measurement, not the "
            f"model); rank by accuracy, a speed, a size or a quality metric."
        )
    if lowered.startswith(HIGHER_IS_BETTER) or lowered.endswith(HIGHER_SUFFIXES):
        return True
    if lowered.startswith(LOWER_IS_BETTER) or lowered.endswith(LOWER_SUFFIXES):
        return False
    raise ConfigError(
        f"{name!r}: quantbench does not know whether more is better; rank by {MEAN_ACCURACY!r}, a <task>_acc, "
        f"tokens_per_s_<n>_stream(s), a *_gb size, a *_s time, bits_per_weight or a quality_* metric."
    )


def is_speed(name: str | None) -> bool:
    """Metrics that measure the benchmark backend as much as the model."""
    return bool(name) and name.replace(" ", "_").startswith(
        ("tokens_per_s", "decode_tokens_per_s", "ttft", "roofline", "vllm_engine_start")
    )


MEMORY_METRICS = ("serve_mem_gb", "peak_mem_gb", "quantize_peak_mem_gb", "eval_peak_mem_gb", "bench_peak_mem_gb")


def is_memory(name: str | None) -> bool:
    """Memory figures: each measured as process RSS, CUDA's allocator peak or device memory (RunRow.mem_basis)."""
    return bool(name) and name.replace(" ", "_") in MEMORY_METRICS


def _bases(name: str, rows: list[RunRow]) -> dict[str, list[RunRow]]:
    """The rows by what `name` measured on them, where that decides whether they compare (speeds and memory)."""
    if is_speed(name):
        return speed_groups(rows)
    if is_memory(name):
        return mem_groups(rows, name.replace(" ", "_"))
    return {"": rows}


def _not_comparable(name: str, groups: dict[str, list[RunRow]]) -> str:
    return (
        f"{name} was measured on different bases ("
        + "; ".join(f"{basis}: {', '.join(r.label for r in rows)}" for basis, rows in groups.items())
        + "), so comparing it measures the backend, the machine or the way it was measured as much as the model; "
        "choose runs of one basis (e.g. a sweep with one bench.backend, or --filter), or set rank_across_backends=true"
    )


def decide(sel: Selection, comparisons: stats.Comparisons, policy: DictConfig) -> list[Decision]:
    """Reject, rank, break ties; every Decision says why its run won or lost."""
    up_rank = 1 if higher_is_better(policy.rank_by) else -1  # a name that ranks nothing is refused first
    up_tie = 1 if policy.tie_break is None or higher_is_better(policy.tie_break) else -1
    decisions = [Decision(r) for r in sel.rows]
    for d in decisions:
        d.rejected = _rejections(d.row, sel, comparisons, policy)
        d.score = metric(d.row, policy.rank_by, sel.tasks)
        d.tie_value = metric(d.row, policy.tie_break, sel.tasks)
        if not d.rejected and d.score is None:
            d.rejected.append(f"has no {policy.rank_by} to rank by" + _nan_note(d.row, policy.rank_by))
    limited = [name for name, limit, _ in _limits(policy) if limit is not None and is_memory(name)]
    finished = [d for d in decisions if d.row.ok]
    for name in limited:  # a memory limit holds runs to one number: it must mean the same on each
        groups = _bases(name, [d.row for d in finished])
        if len(groups) > 1 and not policy.rank_across_backends:
            for d in finished:
                d.rejected.append(f"max_{name} cannot be applied: " + _not_comparable(name, groups))
    candidates = [d for d in decisions if not d.rejected]
    if not candidates:
        for d in decisions:
            d.why = "rejected: " + "; ".join(d.rejected)
        return decisions
    best = max(up_rank * d.score for d in candidates)
    tied = [d for d in candidates if best - up_rank * d.score <= policy.tie_tolerance]
    for name, compared in ((policy.rank_by, candidates), (policy.tie_break, tied if len(tied) > 1 else [])):
        groups = _bases(name, [d.row for d in compared]) if name else {}
        if len(groups) > 1 and not policy.rank_across_backends:
            for d in compared:
                d.rejected.append(f"{name} cannot rank these runs: " + _not_comparable(name, groups))
            for d in decisions:
                if d.rejected:
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


def _limits(policy: DictConfig) -> list[tuple[str, float | None, str]]:
    return [
        ("disk_gb", policy.max_disk_gb, "max"),
        ("serve_mem_gb", policy.max_serve_mem_gb, "max"),
        ("peak_mem_gb", policy.max_peak_mem_gb, "max"),
        ("tokens_per_s_1_stream", policy.min_tokens_per_s_1_stream, "min"),
        ("quality_kl_mean", policy.max_kl_mean, "max"),
    ]


def _nan_note(row: RunRow, name: str) -> str:
    return f" ({row.why_missing(name)})" if name in row.invalid else ""


def _rejections(row: RunRow, sel: Selection, comparisons: stats.Comparisons, policy: DictConfig) -> list[str]:
    if not row.ok:
        return [row.short_status()]
    out = []
    for name, limit, kind in _limits(policy):
        if limit is None:
            continue
        value = row.metrics.get(name)  # NaN and infinities are not in row.metrics: they pass nothing
        if value is None:
            out.append(f"{row.why_missing(name)} to check against {kind} {limit:g}")
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
                    out.append(
                        f"no {task} accuracy to compare with the baseline"
                        + _nan_note(row if acc is None else base, f"{task}_acc")
                    )
                elif 100 * (ref - acc) > policy.max_acc_drop_points:
                    out.append(
                        f"{task} drops {100 * (ref - acc):.2f} pp vs {sel.baseline_method} "
                        f"> max {policy.max_acc_drop_points:g}"
                    )
    if policy.reject_significantly_worse:
        worse = stats.worse_tasks(row.run_id, comparisons)
        if worse:
            out.append("significantly worse than the baseline on " + "; ".join(worse))
    return out


def _v(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
