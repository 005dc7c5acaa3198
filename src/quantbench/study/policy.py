"""The selection policy (the `policy` config group, conf/policy/*.yaml): which run of a sweep is the champion,
and why each other run is not. `registry` registers what it chooses.

1. Every run that is not FINISHED, or breaks a constraint (max_disk_gb, max_serve_mem_gb, max_peak_mem_gb,
   min_tokens_per_s_1_stream, max_kl_mean, max_acc_drop_points, reject_significantly_worse, and under bench=serving
   max_p99_ttft_ms / max_p99_itl_ms at `users` concurrent users), is rejected with the reason.
2. The others are ranked by `rank_by`; runs within `tie_tolerance` of the best are tied, and `tie_break` decides.
   A speed metric ranks runs of one speed basis only (backend and version, machine and threads, benchmark shape),
   and a memory metric, limit or rank, runs whose figures measured the same thing (process RSS, CUDA's allocator,
   device memory), unless `rank_across_backends`. A metric logged as NaN passes no constraint and ranks nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from omegaconf import DictConfig

from quantbench import schema
from quantbench.study import stats
from quantbench.names import stream_label
from quantbench.errors import ConfigError
from quantbench.paths import ROOT
from quantbench.study.runs import RunRow, Selection, mem_groups, speed_groups

MEAN_ACCURACY = "mean accuracy"
QLORA_LIBRARY = "bitsandbytes"


@dataclass
class Constraints:
    """What `quantbench register` (the policy's keys) and `quantbench recommend` (its flags) may ask of a run, by one
    set of names: both commands build one of these and call `choose`, so the same ask gets the same answer."""

    max_disk_gb: float | None = None
    max_serve_mem_gb: float | None = None  # held against memory_need: what serving took on the GPU, else weights
    max_peak_mem_gb: float | None = None
    min_tokens_per_s: float | None = None  # at `streams` concurrent streams
    streams: int = 1
    # bench=serving: the p99 latencies at `users` concurrent users (serve_ttft_p99_ms_c<users>, serve_itl_p99_ms_c<...>)
    max_p99_ttft_ms: float | None = None
    max_p99_itl_ms: float | None = None
    users: int = 1
    min_accuracy: float | None = None  # mean over the tasks, a fraction like lm-eval's
    max_kl_mean: float | None = None  # quality_kl_mean: nats/token from the baseline's next-token distribution
    max_acc_drop_points: float | None = None  # worst task's drop vs the baseline, in percentage points
    reject_significantly_worse: bool = False  # reject a run whose paired-bootstrap CI is below 0 on any task
    prefer_within_noise: bool = False  # rank only runs compared and within noise on every task, if any are
    backend: str | None = None  # only runs benchmarked by this backend (bench_backend tag: hf, vllm)
    fine_tune: bool = False  # only QLoRA-ready bases (bitsandbytes)
    rank_by: str = MEAN_ACCURACY
    tie_tolerance: float = 0.0
    tie_break: str | None = None
    rank_across_backends: bool = False  # rank or limit figures measured on different bases anyway

    @classmethod
    def of(cls, config: "Constraints | DictConfig | dict") -> "Constraints":
        """From a policy config (its other keys, such as alias and registered_name, are not constraints)."""
        if isinstance(config, Constraints):
            return config
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})


# Old names of the constraints above, each mapped to its one name: documented commands use them
# (`recommend --gpu-memory-gb`, `--across-backends`; the policy key min_tokens_per_s_1_stream).
ALIASES = {
    "gpu_memory_gb": "max_serve_mem_gb",
    "across_backends": "rank_across_backends",
    "min_tokens_per_s_1_stream": "min_tokens_per_s",
}


def canonical(name: str) -> str:
    """The constraint's one name, for a name or one of its ALIASES."""
    return ALIASES.get(name, name)


@dataclass
class Decision:
    """What the constraints made of one run."""

    row: RunRow
    rejected: list[str] = field(default_factory=list)
    score: float | None = None
    tie_value: float | None = None
    won: bool = False
    why: str = ""
    memory_gb: float | None = None  # memory_need: what max_serve_mem_gb is held against
    memory_basis: str = ""  # what that figure is, in words
    memory_kind: str = ""  # what it measured (RunRow.mem_basis, "weights", "disk"): figures compare within one kind
    worse_on: list[str] = field(default_factory=list)  # tasks significantly worse than the baseline
    not_compared: list[str] = field(default_factory=list)  # tasks without a difference from the baseline, and why
    set_aside: bool = False  # passed every constraint, but prefer_within_noise ranked only the runs within noise
    by: dict[str, str] = field(default_factory=dict)  # constraint -> its rejection, for those that rejected the run

    @property
    def feasible(self) -> bool:
        return not self.rejected

    @property
    def within_noise(self) -> bool:
        return not self.worse_on and not self.not_compared

    def reject(self, constraint: str, reason: str) -> None:
        self.by.setdefault(constraint, reason)
        self.rejected.append(reason)


@dataclass
class Outcome:
    """Every run's Decision; `refused`: why no run was chosen though some passed every constraint (figures of
    different bases), with one line per run it rests on."""

    decisions: list[Decision]
    refused: str | None = None
    refused_lines: list[str] = field(default_factory=list)

    @property
    def winner(self) -> Decision | None:
        return next((d for d in self.decisions if d.won), None)


def load_policy(overrides: list[str] | None = None) -> DictConfig:
    """The `policy` config group composed by Hydra (conf/register.yaml: `policy: default` over its schema):
    `policy=<name>` picks conf/policy/<name>.yaml, `key=value` or `policy.key=value` sets a key. Hydra refuses an
    unknown key or a value of the wrong type (a typo must not silently relax a rule)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    schema.register()
    qualified = [_qualified(o) for o in overrides or []]
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


def _qualified(override: str) -> str:
    """`key=value` or `policy.key=value` as policy.<the key's one name>=value (an alias's key mapped by ALIASES)."""
    key, eq, value = override.partition("=")
    if key == "policy":
        return override
    return f"policy.{canonical(key.removeprefix('policy.'))}{eq}{value}"


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
                    "quality_top1_agreement", "fingerprint_agreement", "serve_output_tokens_per_s",
                    "serve_tokens_per_s_per_user", "serve_request_throughput", "serve_goodput_concurrency",
                    "serve_goodput_output_tokens_per_s")  # fmt: skip
HIGHER_SUFFIXES = ("_acc", "_acc_norm", "_acc_mean", "_acc_norm_mean")
LOWER_IS_BETTER = ("ttft_s_", "quality_kl_", "quality_ppl", "bits_per_weight", "fingerprint_nll",
                   "fingerprint_reload_nll", "serve_cost_per_million_tokens", "serve_goodput_cost_per_million_tokens",
                   "serve_joules_per_output_token", "serve_goodput_joules_per_output_token", "serve_ttft_",
                   "serve_itl_", "serve_tpot_", "serve_e2el_", "serve_avg_power_w")  # fmt: skip
LOWER_SUFFIXES = ("_gb", "_s", "_acc_std")
NOT_RANKABLE = ("_stderr", "roofline_tokens_per_s_", "memory_bandwidth_gbs", "quality_tokens", "acc_repeats",
                "serve_errors", "serve_completed", "serve_duration_s", "serve_energy_j")  # fmt: skip


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
        ("tokens_per_s", "decode_tokens_per_s", "ttft", "roofline", "vllm_engine_start", "serve_")
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


def memory_need(row: RunRow) -> tuple[float | None, str, str]:
    """GPU memory a run needs (what max_serve_mem_gb is held against), what that figure is in words, and what it
    measured: what serving it took on the GPU (vLLM's engine, read from the device; the HF backend, CUDA's allocator)
    if measured, else its measured peak if it ran on a GPU, else its weights (a CPU peak is host RSS)."""
    for name, words in (("serve_mem_gb", "GPU memory to serve it"), ("peak_mem_gb", "peak GPU memory")):
        if row.on_gpu and row.metrics.get(name) is not None:
            basis = row.mem_basis(name)
            return row.metrics[name], f"{words}, {basis}", f"{name}: {basis}"
    if row.metrics.get("weight_gb") is not None:
        return row.metrics["weight_gb"], "weights only; no GPU peak measured", "weights"
    return row.metrics.get("disk_gb"), "disk size; no weight or GPU peak measured", "disk"


def _not_comparable(name: str, groups: dict[str, list[RunRow]], values: dict[int, float | None]) -> str:
    """Why `name` cannot rank these runs: each basis with its runs, best first, and their values."""
    up = 1 if higher_is_better(name) else -1

    def best_first(row: RunRow) -> float:
        value = values.get(id(row))
        return math.inf if value is None else -up * value

    listed = [
        f"{basis}: " + ", ".join(f"{r.label} ({_v(values.get(id(r)))})" for r in sorted(rows, key=best_first))
        for basis, rows in groups.items()
    ]
    return (
        f"{name} was measured on different bases ({'; '.join(listed)}), so comparing it measures the backend, the "
        "machine or the way it was measured as much as the model; choose runs of one basis (e.g. a sweep with one "
        "bench.backend, --backend, or --filter), or set rank_across_backends=true"
    )


def decide(sel: Selection, comparisons: stats.Comparisons, policy: Constraints | DictConfig) -> list[Decision]:
    """Every run's Decision under the policy (`choose`)."""
    return choose(sel, comparisons, policy).decisions


def choose(sel: Selection, comparisons: stats.Comparisons, constraints: Constraints | DictConfig) -> Outcome:
    """Reject, rank, break ties; every Decision says why its run won or lost."""
    c = Constraints.of(constraints)
    up_rank = 1 if higher_is_better(c.rank_by) else -1  # a name that ranks nothing is refused first
    up_tie = 1 if c.tie_break is None or higher_is_better(c.tie_break) else -1
    decisions = [Decision(r) for r in sel.rows]
    for d in decisions:
        _judge(d, sel, comparisons, c)
        d.score = metric(d.row, c.rank_by, sel.tasks)
        d.tie_value = metric(d.row, c.tie_break, sel.tasks)
        if not d.rejected and d.score is None:
            d.reject("rank_by", f"has no {c.rank_by} to rank by" + _nan_note(d.row, c.rank_by))
    refused = _mixed_memory_figures(decisions, c)
    if refused is not None:
        return refused
    candidates = [d for d in decisions if not d.rejected]
    within = [d for d in candidates if d.within_noise]
    pool = within if c.prefer_within_noise and within else candidates
    for d in candidates:
        if d not in pool:
            d.set_aside = True
            d.why = (
                f"significantly worse than {sel.baseline_method} on " + "; ".join(d.worse_on)
                if d.worse_on
                else f"accuracy not compared with {sel.baseline_method} on {', '.join(d.not_compared)}, so it cannot "
                "count as within noise"
            )
    if not pool:
        return _explained(Outcome(decisions))
    best = max(up_rank * d.score for d in pool)
    best_score = up_rank * best
    rank = c.rank_by
    tied = [d for d in pool if best - up_rank * d.score <= c.tie_tolerance]
    for d in pool:  # explained before a refusal below can return: a run outside the tie lost on rank_by either way
        if d not in tied:
            d.why = (
                f"{rank} {_v(d.score)} is more than {c.tie_tolerance:g} "
                f"{'below' if up_rank > 0 else 'above'} the best ({_v(best_score)})"
            )
    for name, compared, value in (
        (c.rank_by, pool, lambda d: d.score),
        (c.tie_break, tied if len(tied) > 1 else [], lambda d: d.tie_value),
    ):
        groups = _bases(name, [d.row for d in compared]) if name else {}
        if len(groups) > 1 and not c.rank_across_backends:
            refused = f"{name} cannot rank these runs: " + _not_comparable(
                name, groups, {id(d.row): value(d) for d in compared}
            )
            for d in compared:
                d.reject("rank_across_backends", refused)
            lines = [f"{r.label} ({r.run_id}): {basis}" for basis, rows in groups.items() for r in rows]
            return _explained(Outcome(decisions, refused, lines))
    _break_tie(tied, c, up_rank, up_tie, best_score)
    return _explained(Outcome(decisions))


def _mixed_memory_figures(decisions: list[Decision], c: Constraints) -> Outcome | None:
    """A memory limit holds runs to one number, so it must mean one thing: where the runs it decides between measured
    different things (a GPU's used memory, a process's RSS), every one of them is rejected with the reason, and the
    Outcome says so; None where the limits can apply."""
    finished = [d for d in decisions if d.row.ok]
    memory_limits = (
        ("max_serve_mem_gb", c.max_serve_mem_gb, lambda d: (d.memory_gb, d.memory_kind, d.memory_basis)),
        ("max_peak_mem_gb", c.max_peak_mem_gb,
         lambda d: (d.row.metrics.get("peak_mem_gb"), d.row.mem_basis("peak_mem_gb"), d.row.mem_basis("peak_mem_gb"))),
    )  # fmt: skip
    for constraint, limit, figure in memory_limits:
        if limit is None or c.rank_across_backends:
            continue
        kinds: dict[str, list[Decision]] = {}
        for d in finished:  # the runs the limit decides between: those no other constraint rejects
            if not set(d.by) - {constraint} and figure(d)[0] is not None:
                kinds.setdefault(figure(d)[1], []).append(d)
        if len(kinds) > 1:
            refused = (
                f"{constraint} cannot be applied: the runs' memory figures measured different things ("
                + "; ".join(f"{kind}: {', '.join(d.row.label for d in group)}" for kind, group in kinds.items())
                + f"), so one limit of {limit:g} GB would not hold them to the same test; choose runs of one kind "
                "(e.g. --filter), or set rank_across_backends=true"
            )
            lines = [f"{d.row.label} ({d.row.run_id}): {figure(d)[0]:.3g} GB, {figure(d)[2]}" for g in kinds.values()
                     for d in g]  # fmt: skip
            for d in (d for group in kinds.values() for d in group):
                d.reject(constraint, refused)
            return _explained(Outcome(decisions, refused, lines))
    return None


def _break_tie(tied: list[Decision], c: Constraints, up_rank: int, up_tie: int, best_score: float) -> None:
    """The winner among the runs within tie_tolerance of the best: the best tie_break, then the best rank_by, then
    (on a complete tie) the one that needs less memory; each tied run says why it won or lost."""
    rank, tie = c.rank_by, c.tie_break  # up_rank, up_tie: 1 where more is better, -1 where less is
    tied.sort(
        key=lambda d: (
            d.tie_value is None,
            -up_tie * (d.tie_value or 0.0),
            -up_rank * d.score,
            math.inf if d.memory_gb is None else d.memory_gb,
        )
    )
    winner = tied[0]
    winner.won = True
    if len(tied) == 1:
        winner.why = f"best {rank}: {_v(winner.score)}"
    else:
        winner.why = (
            f"{rank} {_v(winner.score)} within {c.tie_tolerance:g} of the best ({_v(best_score)}), "
            f"and best {tie} among the {len(tied)} tied: {_v(winner.tie_value)}"
        )
    for d in tied:
        if d is not winner:
            d.why = (
                f"tied on {rank} ({_v(d.score)} vs best {_v(best_score)}, within {c.tie_tolerance:g}) "
                f"but lost the tie-break on {tie}: {_v(d.tie_value)} vs {_v(winner.tie_value)}"
            )


def _explained(outcome: Outcome) -> Outcome:
    for d in outcome.decisions:
        if d.rejected:
            d.why = "rejected: " + "; ".join(d.rejected)
    return outcome


def _nan_note(row: RunRow, name: str) -> str:
    return f" ({row.why_missing(name)})" if name in row.invalid else ""


def _judge(d: Decision, sel: Selection, comparisons: stats.Comparisons, c: Constraints) -> None:
    """Fill in what the run measured against the baseline, and reject it for each constraint it breaks."""
    row = d.row
    d.memory_gb, d.memory_basis, d.memory_kind = memory_need(row)
    if not row.ok:
        d.reject("status", row.short_status())
        return
    d.worse_on = stats.worse_tasks(row.run_id, comparisons)
    compared = comparisons.get(row.run_id or "", {})
    if sel.baseline is not None and row.run_id != sel.baseline.run_id and not row.random_weights:
        d.not_compared = [
            f"{t} ({row.why_missing(f'{t}_acc')} accuracy)" if row.acc(t) is None else t
            for t in sel.tasks
            if t not in compared
        ]
    if c.max_serve_mem_gb is not None:
        if d.memory_gb is None:
            d.reject("max_serve_mem_gb", "no memory measurement")
        elif d.memory_gb > c.max_serve_mem_gb:
            d.reject(
                "max_serve_mem_gb",
                f"needs {d.memory_gb:.3g} GB ({d.memory_basis}) > {c.max_serve_mem_gb:g} GB budget",
            )
    for constraint, name, limit, kind in (
        ("max_disk_gb", "disk_gb", c.max_disk_gb, "max"),
        ("max_peak_mem_gb", "peak_mem_gb", c.max_peak_mem_gb, "max"),
        ("min_tokens_per_s", f"tokens_per_s_{stream_label(c.streams)}", c.min_tokens_per_s, "min"),
        ("max_kl_mean", "quality_kl_mean", c.max_kl_mean, "max"),
        ("max_p99_ttft_ms", f"serve_ttft_p99_ms_c{c.users}", c.max_p99_ttft_ms, "max"),
        ("max_p99_itl_ms", f"serve_itl_p99_ms_c{c.users}", c.max_p99_itl_ms, "max"),
    ):
        if limit is None:
            continue
        value = row.metrics.get(name)  # NaN and infinities are not in row.metrics: they pass nothing
        if value is None:
            d.reject(constraint, f"{row.why_missing(name)} to check against {kind} {limit:g}")
        elif (value > limit) if kind == "max" else (value < limit):
            d.reject(constraint, f"{name} {value:.4g} {'>' if kind == 'max' else '<'} {kind} {limit:g}")
    if c.min_accuracy is not None:
        acc = row.mean_acc(sel.tasks)
        if acc is None:
            d.reject("min_accuracy", "no accuracy on every task")
        elif acc < c.min_accuracy:
            d.reject("min_accuracy", f"mean accuracy {acc:.1%} < {c.min_accuracy:.1%}")
    if c.max_acc_drop_points is not None:
        base = sel.baseline
        if base is None:
            d.reject(
                "max_acc_drop_points", f"cannot check the accuracy drop: no finished {sel.baseline_method} baseline"
            )
        else:
            for task in sel.tasks:
                acc, ref = row.acc(task), base.acc(task)
                if acc is None or ref is None:
                    d.reject(
                        "max_acc_drop_points",
                        f"no {task} accuracy to compare with the baseline"
                        + _nan_note(row if acc is None else base, f"{task}_acc"),
                    )
                elif 100 * (ref - acc) > c.max_acc_drop_points:
                    d.reject(
                        "max_acc_drop_points",
                        f"{task} drops {100 * (ref - acc):.2f} pp vs {sel.baseline_method} "
                        f"> max {c.max_acc_drop_points:g}",
                    )
    if c.reject_significantly_worse and d.worse_on:
        d.reject("reject_significantly_worse", "significantly worse than the baseline on " + "; ".join(d.worse_on))
    if c.backend is not None and row.tags.get("bench_backend") != c.backend:
        d.reject("backend", f"benchmarked by {row.tags.get('bench_backend', 'no backend')}, not {c.backend}")
    if c.fine_tune and row.tags.get("quant_library") != QLORA_LIBRARY:
        d.reject(
            "fine_tune",
            f"fine-tuning with QLoRA needs a {QLORA_LIBRARY} base; "
            f"this is {row.tags.get('quant_library', 'unknown library')}",
        )


def _v(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
