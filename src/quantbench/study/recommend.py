"""The seed's decision matrix, answered from measurements instead of from the blog post.

`quantbench recommend --gpu-memory-gb 6 --min-accuracy 0.5 --min-tokens-per-s 100 --fine-tune`
filters the sweep's finished runs by the constraints, prefers those whose accuracy is statistically
indistinguishable from the baseline (paired bootstrap per task), and among them picks the fastest — saying
why, and on which run ids that rests. A run whose accuracy could not be compared with the baseline is not
"within noise"; tokens/s and memory figures are compared only where they measured the same thing. The constraints
are quantbench.study.policy.Constraints and policy.choose decides, as for `quantbench register`: the same names and rules
(`--gpu-memory-gb` is the policy's max_serve_mem_gb, `--across-backends` its rank_across_backends).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass

from quantbench.study import stats
from quantbench.names import stream_label
from quantbench.errors import ConfigError
from quantbench.study.policy import ALIASES, QLORA_LIBRARY, Constraints, Decision, choose
from quantbench.study.runs import RunRow, Selection, Store, add_store_args

log = logging.getLogger(__name__)

# The seed's matrix (constraint -> its recommendation), kept next to ours so that disagreements show.
SEED_MATRIX = {
    "production": "AWQ or AutoRound-sym",
    "legacy": "GPTQ",
    "fine_tune": "Bitsandbytes",
    "min_memory": "AQLM 2-bit (accept slower tokens/s)",
}


@dataclass
class Recommendation:
    choice: Decision | None
    why: str
    others: list[str]
    assessments: list[Decision]  # the finished runs'


def fastest(c: Constraints) -> Constraints:
    """The constraints as recommend ranks: the fastest at `streams` (or a serving figure they name, `serve_*`: the
    least cost per million tokens, the most tokens/s at `users`), among the runs within noise if any are."""
    return dataclasses.replace(
        c,
        rank_by=c.rank_by if c.rank_by.startswith("serve_") else f"tokens_per_s_{stream_label(c.streams)}",
        tie_tolerance=0.0,
        tie_break=None,
        prefer_within_noise=True,
    )


def assess(sel: Selection, comparisons: stats.Comparisons, c: Constraints) -> list[Decision]:
    """The finished runs against the constraints (policy.choose, ranked by speed)."""
    return [d for d in choose(sel, comparisons, fastest(c)).decisions if d.row.ok]


def memory_kinds(assessments: list[Decision]) -> dict[str, list[Decision]]:
    """Decisions with a memory figure by what it measured, in the order first seen."""
    kinds: dict[str, list[Decision]] = {}
    for a in assessments:
        if a.memory_gb is not None:
            kinds.setdefault(a.memory_kind, []).append(a)
    return kinds


def recommend(sel: Selection, comparisons: stats.Comparisons, c: Constraints) -> Recommendation:
    """Feasible runs; of those, the ones compared with the baseline on every task and significantly worse on none;
    of those, the fastest (policy.choose decides, as it does for `quantbench register`)."""
    outcome = choose(sel, comparisons, fastest(c))
    assessments = [d for d in outcome.decisions if d.row.ok]
    if outcome.refused:
        return Recommendation(None, outcome.refused, outcome.refused_lines, assessments)
    best = outcome.winner
    if best is None:
        lines = [f"{a.row.label} ({a.row.run_id}): " + "; ".join(a.rejected) for a in assessments]
        memory_bound = any("max_serve_mem_gb" in a.by for a in assessments)
        return Recommendation(
            None,
            "No measured method meets every constraint"
            + (
                " (the seed's advice when memory is short: a smaller base model before going below 4 bits)."
                if memory_bound
                else "."
            ),
            lines,
            assessments,
        )
    accurate = best.within_noise
    why = (
        f"{best.row.label} (run {best.row.run_id}): {_describe(best, sel, c)}"
        + (
            ""
            if best.worse_on
            else f"; no task significantly worse than {sel.baseline_method}"
            if comparisons.get(best.row.run_id or "") and not best.not_compared
            else f"; accuracy not compared with {sel.baseline_method}"
            + (" (random weights)" if best.row.random_weights else "")
            + (f" on {', '.join(best.not_compared)}" if best.not_compared else "")
        )
        + (
            ""
            if accurate or not best.worse_on
            else " — but every feasible run is significantly worse than the baseline somewhere: "
            + "; ".join(best.worse_on)
        )
    )
    others = []
    for a in assessments:
        if a is best:
            continue
        if not a.feasible:
            others.append(f"{a.row.label} ({a.row.run_id}): excluded — " + "; ".join(a.rejected))
        elif a.set_aside:
            others.append(f"{a.row.label} ({a.row.run_id}): {a.why}")
        else:
            others.append(f"{a.row.label} ({a.row.run_id}): ranked lower — {_speed(a.row, c)} vs {_speed(best.row, c)}")
    return Recommendation(best, why, others, assessments)


def decision_matrix(sel: Selection, comparisons: stats.Comparisons) -> list[dict[str, str]]:
    """The seed's four constraints, each answered by the measured runs (the baseline is never the answer)."""
    quantized = Selection(
        sel.experiment,
        sel.experiment_id,
        sel.sweep,
        [r for r in sel.rows if r.method != sel.baseline_method],
        sel.baseline_method,
        sel.baseline,
        sel.baseline_note,
    )
    rows: list[dict[str, str]] = []

    def add(key: str, constraint: str, rec: Recommendation | None, evidence: str | None = None) -> None:
        choice = rec.choice.row if rec and rec.choice else None
        rows.append(
            {
                "constraint": constraint,
                "recommended": choice.label if choice else "none measured",
                "evidence": evidence or (rec.why if rec else ""),
                "seed": SEED_MATRIX[key],
                "runs": choice.run_id if choice and choice.run_id else "",
            }
        )

    add(
        "production",
        "Production inference (fastest at 1 stream, accuracy within noise of the baseline)",
        recommend(quantized, comparisons, Constraints()),
    )
    gptq = [r for r in quantized.finished if r.method.startswith("gptq")]
    legacy = (
        recommend(
            Selection(sel.experiment, sel.experiment_id, sel.sweep, gptq, sel.baseline_method, sel.baseline),
            comparisons,
            Constraints(),
        )
        if gptq
        else None
    )
    add(
        "legacy",
        "Mature tooling / legacy stack support",
        legacy,
        None if gptq else "maturity is not measured, and no GPTQ run finished in this sweep",
    )
    add("fine_tune", "Fine-tuning (QLoRA)", recommend(quantized, comparisons, Constraints(fine_tune=True)))
    kinds = memory_kinds(assess(quantized, comparisons, Constraints()))
    smallest = sorted(next(iter(kinds.values()), []), key=lambda a: a.memory_gb)
    if len(kinds) > 1:
        least = "; ".join(f"{kind}: {min(g, key=lambda a: a.memory_gb).row.label}" for kind, g in kinds.items())
        add(
            "min_memory",
            "Tight GPU memory / absolute minimum memory",
            None,
            f"not comparable: the runs' memory figures measured different things (smallest of each: {least})",
        )
    elif smallest:
        s = smallest[0]
        rec = Recommendation(s, "", [], [])
        add(
            "min_memory",
            "Tight GPU memory / absolute minimum memory",
            rec,
            f"{s.row.label} (run {s.row.run_id}): smallest, {_describe(s, sel, Constraints())}"
            + (f"; significantly worse on {'; '.join(s.worse_on)}" if s.worse_on else ""),
        )
    else:
        add("min_memory", "Tight GPU memory / absolute minimum memory", None, "no run measured memory")
    return rows


def _describe(a: Decision, sel: Selection, c: Constraints) -> str:
    acc = a.row.mean_acc(sel.tasks)
    parts = [
        f"needs {a.memory_gb:.3g} GB ({a.memory_basis})" if a.memory_gb is not None else "memory not measured",
        f"mean accuracy {acc:.1%}" if acc is not None else "accuracy not measured",
        _speed(a.row, c),
    ]
    if c.fine_tune:
        parts.append(f"{QLORA_LIBRARY}: QLoRA-ready")
    return ", ".join(parts)


def _speed(row: RunRow, c: Constraints) -> str:
    """What recommend ranked the run by: a serving figure it was asked for (`serve_*`), else tokens/s at `streams`."""
    if c.rank_by.startswith("serve_"):
        value = row.metrics.get(c.rank_by)
        return f"{c.rank_by} {'—' if value is None else f'{value:.4g}'}"
    return f"{_tps(row, c.streams)} tokens/s at {_streams(c.streams)}"


def _tps(row: RunRow, n: int) -> str:
    v = row.tokens_per_s(n)
    return "—" if v is None else f"{v:.0f}"


def _streams(n: int) -> str:
    return f"{n} stream" if n == 1 else f"{n} streams"


def _number(ge: float | None = None, gt: float | None = None, le: float | None = None):
    """An argparse type: a finite number within the bounds (a NaN budget would pass every run)."""

    def parse(text: str) -> float:
        value = float(text)
        if (
            not math.isfinite(value)
            or (ge is not None and value < ge)
            or (gt is not None and value <= gt)
            or (le is not None and value > le)
        ):
            bounds = ", ".join(f"{op} {b:g}" for op, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None)
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bounds}")
        return value

    return parse


def _flags(name: str) -> list[str]:
    """The flags of a constraint: --<its one name> and --<each of its ALIASES> (policy.ALIASES, the one table)."""
    return [f"--{n.replace('_', '-')}" for n in (name, *(old for old, new in ALIASES.items() if new == name))]


def serving_objective(users: int | None, least_cost: bool) -> str:
    """What recommend ranks by under bench=serving flags: the least cost per million output tokens (at `users`, else
    at each run's goodput point), the most output tokens/s at `users`; else the default (tokens/s at --streams)."""
    if least_cost:
        return f"serve_cost_per_million_tokens_c{users}" if users else "serve_goodput_cost_per_million_tokens"
    return f"serve_output_tokens_per_s_c{users}" if users else Constraints.rank_by


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench recommend", description=__doc__.split("\n\n")[0])
    p.add_argument(*_flags("max_serve_mem_gb"), type=_number(gt=0), help="GPU memory budget (GB)")
    p.add_argument(
        "--min-accuracy", type=_number(ge=0, le=100), help="minimum mean accuracy over tasks (0.5 or 50 for 50%%)"
    )
    p.add_argument(*_flags("min_tokens_per_s"), type=_number(ge=0), help="minimum output tokens/s")
    p.add_argument("--streams", type=int, default=1, choices=range(1, 1025), metavar="N",
                   help="concurrent streams the tokens/s floor applies to")  # fmt: skip
    p.add_argument("--fine-tune", action="store_true", help="the model will be fine-tuned (QLoRA: bitsandbytes)")
    p.add_argument(
        "--max-kl-mean",
        type=_number(ge=0),
        help="maximum mean KL divergence from the baseline's next-token distribution (nats/token)",
    )
    p.add_argument("--backend", help="only runs benchmarked by this backend (hf, vllm, serving)")
    p.add_argument(
        "--max-p99-ttft-ms", type=_number(gt=0), help="bench=serving: p99 time to first token limit at --users"
    )
    p.add_argument(
        "--max-p99-itl-ms", type=_number(gt=0), help="bench=serving: p99 inter-token latency limit at --users"
    )
    p.add_argument("--users", type=int, default=None, choices=range(1, 100001), metavar="N",
                   help="bench=serving: concurrent users the latency limits apply to; ranks by output tokens/s there")  # fmt: skip
    p.add_argument(
        "--least-cost",
        action="store_true",
        help="bench=serving: rank by cost per million output tokens (at --users, else at each run's goodput at its SLO; "
        "needs hardware.cost_per_hour)",
    )
    p.add_argument(
        *_flags("rank_across_backends"),
        action="store_true",
        help="rank tokens/s or hold memory figures measured by different backends or machines against each other anyway",
    )
    add_store_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = Store(args.tracking_uri)
    try:
        sel = store.select(args.experiment, args.sweep, args.filter, args.baseline)
    except ConfigError as exc:  # no such experiment or sweep: the paragraph, exit 1
        print(exc, file=sys.stderr)
        return 1
    min_acc = args.min_accuracy / 100 if args.min_accuracy is not None and args.min_accuracy > 1 else args.min_accuracy
    objective = serving_objective(args.users, args.least_cost)
    rec = recommend(
        sel,
        store.compare(sel),
        Constraints(
            max_serve_mem_gb=args.max_serve_mem_gb,
            min_accuracy=min_acc,
            min_tokens_per_s=args.min_tokens_per_s,
            streams=args.streams,
            fine_tune=args.fine_tune,
            max_kl_mean=args.max_kl_mean,
            backend=args.backend,
            rank_across_backends=args.rank_across_backends,
            max_p99_ttft_ms=args.max_p99_ttft_ms,
            max_p99_itl_ms=args.max_p99_itl_ms,
            users=args.users or 1,
            rank_by=objective,
        ),
    )
    log.info(
        "Experiment %s, sweep %s (%d runs), baseline %s.%s",
        sel.experiment,
        sel.sweep,
        len(sel.rows),
        sel.baseline_method,
        f" {sel.baseline_note}" if sel.baseline_note else "",
    )
    log.info(
        "Constraints: GPU memory <= %s GB, mean accuracy >= %s, tokens/s >= %s at %s, KL <= %s, fine-tune: %s%s",
        args.max_serve_mem_gb,
        f"{min_acc:.1%}" if min_acc is not None else None,
        args.min_tokens_per_s,
        _streams(args.streams),
        args.max_kl_mean,
        "yes (QLoRA)" if args.fine_tune else "no",
        f", backend: {args.backend}" if args.backend else "",
    )
    if args.max_p99_ttft_ms or args.max_p99_itl_ms or args.users or args.least_cost:
        log.info(
            "Serving: p99 TTFT <= %s ms, p99 ITL <= %s ms at %s users; ranked by %s",
            args.max_p99_ttft_ms,
            args.max_p99_itl_ms,
            args.users or 1,
            objective,
        )
    for row in sel.rows:
        if not row.ok:
            log.info("Not considered: %s (%s): %s", row.label, row.run_id or "no run", row.short_status())
    log.info("Recommendation: %s", rec.why)
    for line in rec.others:
        log.info("  %s", line)
    return 0 if rec.choice else 1


if __name__ == "__main__":
    sys.exit(main())
