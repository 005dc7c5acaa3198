"""`quantbench search`: what an Optuna search (hydra/sweeper=optuna, conf/search/) found, read back from its study
and the MLflow runs of its trials: the Pareto front (feasible trials only, each labelled with its run), every trial's
state (a failed or constraint-violating one is listed as such), Optuna's importance of each parameter per objective,
and which runs of another sweep (the default grid) a front trial beats on every objective. Register and recommend
pick from the same trials with `--sweep study:<name>`.

Importances come from Optuna's PED-ANOVA evaluator: no scikit-learn model to fit, and meaningful on the handful of
trials a search on one GPU affords (fANOVA, Optuna's default, fits a random forest).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from quantbench.errors import ConfigError
from quantbench.stores import import_optuna, optuna_storage, study_storage
from quantbench.study.runs import ALL_SWEEPS, ROOT, Store, add_store_args

log = logging.getLogger(__name__)


@dataclass
class Trial:
    number: int
    state: str
    params: dict
    values: dict[str, float]
    run_id: str | None
    feasible: bool
    on_front: bool
    why: str = ""  # a failed trial's reason, a violated constraint


def load(storage: str, study_name: str):
    import warnings

    optuna = import_optuna()

    # the stale-trial retry's reader is "experimental" in Optuna 5; it is what the sweeper's resume rests on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    try:
        return optuna.load_study(study_name=study_name, storage=study_storage(storage))
    except KeyError as exc:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ConfigError(f"No study {study_name!r} in {storage}; it holds {names or 'none'}.") from exc


def objectives(study) -> list[str]:
    """The objective metrics' names, in order, as the sweeper stored them (study user attribute)."""
    names = study.user_attrs.get("objectives")
    return list(names) if names else [f"objective_{i}" for i in range(len(study.directions))]


def trials(study) -> list[Trial]:
    from optuna.trial import TrialState

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    names = objectives(study)
    front = {t.number for t in study.best_trials}
    every = study.get_trials(deepcopy=False)
    retry_of = {
        n: t.number for t in every if (n := RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None
    }
    out = []
    for t in every:
        if t.state == TrialState.WAITING:
            continue
        violated = [k.split(":", 1)[1] for k, v in t.system_attrs.items() if k.startswith("constraints:") and v > 0]
        why = t.user_attrs.get("failed", "") or (f"violates {', '.join(violated)}" if violated else "")
        if t.state == TrialState.FAIL and not why:
            why = "stale: its sweeper stopped while the job ran" + (
                f"; retried as trial {retry_of[t.number]}" if t.number in retry_of else ""
            )
        out.append(
            Trial(t.number, t.state.name, dict(t.params), dict(zip(names, t.values or [])),
                  t.user_attrs.get("run_id"), not violated, t.number in front, why)
        )  # fmt: skip
    return out


# PED-ANOVA sets the best trials (its top quantile) apart from the rest. With fewer complete trials it still returns
# figures (on two, every parameter about equal), which would read as a finding; its default quantile, 0.1, makes the
# top one trial up to ten, so the quantile used holds at least two.
MIN_TRIALS_FOR_IMPORTANCE = 4


def importance_quantile(complete: int) -> float:
    """PED-ANOVA's top quantile over `complete` trials: Optuna's 0.1, or as much as holds two trials."""
    return max(0.1, 2 / complete)


def importances(study) -> dict[str, dict[str, float]]:
    """Optuna's importance of each parameter, per objective (PED-ANOVA: the parameters that set the top quantile
    apart). Empty where there are too few complete trials to say, or PED-ANOVA cannot (logged)."""
    optuna = import_optuna()
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.study import StudyDirection

    complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        return {name: {} for name in objectives(study)}
    out = {}
    for i, name in enumerate(objectives(study)):
        sign = -1.0 if study.directions[i] == StudyDirection.MAXIMIZE else 1.0  # PED-ANOVA: low is good
        try:
            out[name] = optuna.importance.get_param_importances(
                study,
                evaluator=PedAnovaImportanceEvaluator(target_quantile=importance_quantile(complete)),
                target=lambda t, i=i, s=sign: s * t.values[i],
            )
        except (ValueError, RuntimeError) as exc:
            log.info("No importances for %s: %s", name, exc)
            out[name] = {}
    return out


def beaten(front: list[Trial], grid: list, directions: dict[str, str]) -> list[tuple[Trial, object]]:
    """(front trial, grid run) pairs where the trial is strictly better on every objective."""

    def better(a: float, b: float, direction: str) -> bool:
        return a < b if direction == "minimize" else a > b

    pairs = []
    for t in front:
        for row in grid:
            if all(m in row.metrics and better(t.values[m], row.metrics[m], d) for m, d in directions.items()):
                pairs.append((t, row))
    return pairs


def page(study, rows: list[Trial], imp: dict[str, dict[str, float]], beats: list | None, grid_name: str) -> str:
    names = objectives(study)
    directions = dict(zip(names, (d.name.lower() for d in study.directions)))
    lines = [f"# Search {study.study_name}", "",
             f"Objectives: {', '.join(f'{n} ({d})' for n, d in directions.items())}. "
             f"Trials: {len(rows)} ({sum(r.state == 'COMPLETE' for r in rows)} complete, "
             f"{sum(not r.feasible for r in rows)} infeasible, {sum(r.state == 'FAIL' for r in rows)} failed).", "",
             "## Trials (front: the Pareto front of the feasible trials)", "",
             "| trial | front | state | " + " | ".join(names) + " | params | run | note |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|"]  # fmt: skip
    best = {}  # the front's extreme on each objective, labelled as the pick of a user who cares for that one only
    for n, d in directions.items():
        on_front = [r for r in rows if r.on_front and n in r.values]
        if on_front:
            pick = (min if d == "minimize" else max)(on_front, key=lambda r: r.values[n])
            best.setdefault(pick.number, []).append(f"best {n}")
    for r in rows:
        vals = " | ".join(f"{r.values[n]:.4g}" if n in r.values else "—" for n in names)
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        front = ("**front**" + "".join(f", {label}" for label in best.get(r.number, []))) if r.on_front else ""
        lines.append(f"| {r.number} | {front} | {r.state} | {vals} | {params} | "
                     f"{(r.run_id or '—')[:8]} | {r.why} |")  # fmt: skip
    complete = sum(r.state == "COMPLETE" for r in rows)
    lines += ["", "## Parameter importance (Optuna, PED-ANOVA)", ""]
    if complete >= MIN_TRIALS_FOR_IMPORTANCE:
        lines += [
            f"Over {complete} complete trials, the best {importance_quantile(complete):.0%} against the rest.",
            "",
        ]
    for name, by_param in imp.items():
        if by_param:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in by_param.items())
        elif complete < MIN_TRIALS_FOR_IMPORTANCE:
            shown = f"too few complete trials to say ({complete}; at least {MIN_TRIALS_FOR_IMPORTANCE})"
        else:
            shown = "PED-ANOVA gave none (see the log)"
        lines.append(f"- {name}: {shown}")
    if beats is not None:
        lines += ["", f"## Against {grid_name}", ""]
        if beats:
            lines += [f"- trial {t.number} beats {row.label} on every objective: "
                      + ", ".join(f"{n} {t.values[n]:.4g} vs {row.metrics[n]:.4g}" for n in names)
                      for t, row in beats]  # fmt: skip
        else:
            lines.append(f"- none found: no front trial is strictly better than a run of {grid_name} on every "
                         f"objective")  # fmt: skip
    return "\n".join(lines) + "\n"


def pareto_plot(study, rows: list[Trial], path: Path) -> Path | None:
    """The first two objectives: every trial, infeasible ones crossed, the front labelled with trial numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = objectives(study)
    done = [r for r in rows if r.state == "COMPLETE" and len(r.values) >= 2]
    if len(names) < 2 or not done:
        return None
    x, y = names[0], names[1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in done:
        style = dict(marker="x", color="tab:red") if not r.feasible else dict(marker="o", color="tab:grey")
        if r.on_front:
            style = dict(marker="o", color="tab:blue")
        ax.scatter(r.values[x], r.values[y], **style)
        if r.on_front:
            ax.annotate(f"trial {r.number}", (r.values[x], r.values[y]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{study.study_name}: front (blue), infeasible (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench search", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--study", required=True, help="the study's name (hydra.sweeper.study_name)")
    p.add_argument("--storage", help="Optuna storage URL (default: optuna.db beside the SQLite MLflow store)")
    p.add_argument("--grid", help=f"a sweep_id (or '{ALL_SWEEPS}') whose runs the front is compared with")
    p.add_argument("--out", type=Path, help="output folder (default: reports/search-<study>/ under the repo root)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    storage = args.storage or optuna_storage(args.tracking_uri)
    if storage is None:
        print(f"--storage is needed: the runs are at {args.tracking_uri}, not in a SQLite file", file=sys.stderr)
        return 2
    try:
        study = load(storage, args.study)
        grid = Store(args.tracking_uri).select(args.experiment, args.grid, args.filter).finished if args.grid else None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    rows = trials(study)
    directions = dict(zip(objectives(study), (d.name.lower() for d in study.directions)))
    beats = beaten([r for r in rows if r.on_front], grid, directions) if grid is not None else None
    out = args.out or ROOT / "reports" / f"search-{args.study}"
    out.mkdir(parents=True, exist_ok=True)
    text = page(study, rows, importances(study), beats, f"sweep {args.grid}")
    (out / "search.md").write_text(text)
    plot = pareto_plot(study, rows, out / "front.png")
    sys.stdout.write(text)
    log.info("Wrote %s%s", out / "search.md", f", {plot}" if plot else "")
    return 0
