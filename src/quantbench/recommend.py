"""The seed's decision matrix, answered from measurements instead of from the blog post.

`quantbench recommend --gpu-memory-gb 6 --min-accuracy 0.5 --min-tokens-per-s 100 --fine-tune`
filters the sweep's finished runs by the constraints, prefers those whose accuracy is statistically
indistinguishable from the baseline (paired bootstrap per task), and among them picks the fastest — saying
why, and on which run ids that rests. A run whose accuracy could not be compared with the baseline is not
"within noise"; tokens/s and memory figures are compared only where they measured the same thing.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field

from quantbench import stats
from quantbench.bench import stream_label
from quantbench.runs import RunRow, Selection, Store, add_store_args, speed_groups

log = logging.getLogger(__name__)

QLORA_LIBRARY = "bitsandbytes"
# The seed's matrix (constraint -> its recommendation), kept next to ours so that disagreements show.
SEED_MATRIX = {
    "production": "AWQ or AutoRound-sym",
    "legacy": "GPTQ",
    "fine_tune": "Bitsandbytes",
    "min_memory": "AQLM 2-bit (accept slower tokens/s)",
}


@dataclass
class Constraints:
    gpu_memory_gb: float | None = None
    min_accuracy: float | None = None  # a fraction, like the accuracies lm-eval logs
    min_tokens_per_s: float | None = None
    streams: int = 1
    fine_tune: bool = False
    max_kl_mean: float | None = None  # quality_kl_mean: nats per token from the baseline's next-token distribution
    backend: str | None = None  # only runs benchmarked by this backend (bench_backend tag: hf, vllm)
    across_backends: bool = False  # rank tokens/s measured by different backends or machines anyway


@dataclass
class Assessment:
    """One finished run against the constraints: why it is out, or how it ranks."""

    row: RunRow
    excluded: list[str] = field(default_factory=list)
    worse_on: list[str] = field(default_factory=list)  # tasks significantly worse than the baseline
    not_compared: list[str] = field(default_factory=list)  # tasks without a difference from the baseline, and why
    memory_gb: float | None = None
    memory_basis: str = ""  # what the figure is, in words
    memory_kind: str = ""  # what it measured (RunRow.mem_basis, "weights", "disk"): figures compare within one kind
    budget_excluded: bool = False  # excluded by the memory budget (alone, or besides other reasons)

    @property
    def feasible(self) -> bool:
        return not self.excluded


@dataclass
class Recommendation:
    choice: Assessment | None
    why: str
    others: list[str]
    assessments: list[Assessment]


def memory_need(row: RunRow) -> tuple[float | None, str, str]:
    """GPU memory a run needs, what that figure is in words, and what it measured: what serving it took on the GPU
    (vLLM's engine, read from the device; the HF backend, CUDA's allocator) if measured, else its measured peak if it
    ran on a GPU, else its weights (a CPU peak is host RSS)."""
    for name, words in (("serve_mem_gb", "GPU memory to serve it"), ("peak_mem_gb", "peak GPU memory")):
        if row.on_gpu and row.metrics.get(name) is not None:
            basis = row.mem_basis(name)
            return row.metrics[name], f"{words}, {basis}", f"{name}: {basis}"
    if row.metrics.get("weight_gb") is not None:
        return row.metrics["weight_gb"], "weights only; no GPU peak measured", "weights"
    return row.metrics.get("disk_gb"), "disk size; no weight or GPU peak measured", "disk"


def memory_kinds(assessments: list[Assessment]) -> dict[str, list[Assessment]]:
    """Assessments with a memory figure by what it measured, in the order first seen."""
    kinds: dict[str, list[Assessment]] = {}
    for a in assessments:
        if a.memory_gb is not None:
            kinds.setdefault(a.memory_kind, []).append(a)
    return kinds


def _kinds_text(kinds: dict[str, list[Assessment]]) -> str:
    return "; ".join(f"{kind}: {', '.join(a.row.label for a in group)}" for kind, group in kinds.items())


def assess(sel: Selection, comparisons: stats.Comparisons, c: Constraints) -> list[Assessment]:
    out = []
    for row in sel.finished:
        a = Assessment(row)
        a.memory_gb, a.memory_basis, a.memory_kind = memory_need(row)
        a.worse_on = stats.worse_tasks(row.run_id, comparisons)
        compared = comparisons.get(row.run_id or "", {})
        if sel.baseline is not None and row.run_id != sel.baseline.run_id and not row.random_weights:
            a.not_compared = [
                f"{t} ({row.why_missing(f'{t}_acc')} accuracy)" if row.acc(t) is None else t
                for t in sel.tasks
                if t not in compared
            ]
        if c.gpu_memory_gb is not None:
            a.budget_excluded = a.memory_gb is None or a.memory_gb > c.gpu_memory_gb
            if a.memory_gb is None:
                a.excluded.append("no memory measurement")
            elif a.memory_gb > c.gpu_memory_gb:
                a.excluded.append(f"needs {a.memory_gb:.3g} GB ({a.memory_basis}) > {c.gpu_memory_gb:g} GB budget")
        if c.min_accuracy is not None:
            acc = row.mean_acc(sel.tasks)
            if acc is None:
                a.excluded.append("no accuracy on every task")
            elif acc < c.min_accuracy:
                a.excluded.append(f"mean accuracy {acc:.1%} < {c.min_accuracy:.1%}")
        if c.min_tokens_per_s is not None:
            tps = row.tokens_per_s(c.streams)
            if tps is None:
                a.excluded.append(f"{row.why_missing(f'tokens_per_s_{stream_label(c.streams)}')} at this stream count")
            elif tps < c.min_tokens_per_s:
                a.excluded.append(f"{tps:.0f} tokens/s < {c.min_tokens_per_s:g} at {_streams(c.streams)}")
        if c.max_kl_mean is not None:
            kl = row.metrics.get("quality_kl_mean")
            if kl is None:
                a.excluded.append(f"{row.why_missing('quality_kl_mean')} (run with a quality config)")
            elif kl > c.max_kl_mean:
                a.excluded.append(f"KL divergence from the baseline {kl:.3g} > {c.max_kl_mean:g} nats/token")
        if c.backend is not None and row.tags.get("bench_backend") != c.backend:
            a.excluded.append(f"benchmarked by {row.tags.get('bench_backend', 'no backend')}, not {c.backend}")
        if c.fine_tune and row.tags.get("quant_library") != QLORA_LIBRARY:
            a.excluded.append(
                f"fine-tuning with QLoRA needs a {QLORA_LIBRARY} base; "
                f"this is {row.tags.get('quant_library', 'unknown library')}"
            )
        out.append(a)
    return out


def recommend(sel: Selection, comparisons: stats.Comparisons, c: Constraints) -> Recommendation:
    """Feasible runs; of those, the ones compared with the baseline on every task and significantly worse on none;
    of those, the fastest."""
    assessments = assess(sel, comparisons, c)
    # the runs the budget decides between: those no other constraint excludes
    kinds = memory_kinds([a for a in assessments if len(a.excluded) == int(a.budget_excluded)])
    if c.gpu_memory_gb is not None and len(kinds) > 1 and not c.across_backends:
        return Recommendation(
            None,
            f"The runs' memory figures measured different things ({_kinds_text(kinds)}), so one budget of "
            f"{c.gpu_memory_gb:g} GB would not hold them to the same test. Choose runs of one kind with --filter, "
            f"or compare them anyway with --across-backends.",
            [
                f"{a.row.label} ({a.row.run_id}): {a.memory_gb:.3g} GB, {a.memory_basis}"
                for k in kinds.values()
                for a in k
            ],
            assessments,
        )
    feasible = [a for a in assessments if a.feasible]
    accurate = [a for a in feasible if not a.worse_on and not a.not_compared]
    pool = accurate or feasible
    if not pool:
        lines = [f"{a.row.label} ({a.row.run_id}): " + "; ".join(a.excluded) for a in assessments]
        memory_bound = any("budget" in reason for a in assessments for reason in a.excluded)
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
    pool.sort(key=lambda a: (-(a.row.tokens_per_s(c.streams) or -1.0), a.memory_gb or 0.0))
    groups = speed_groups(a.row for a in pool)
    if len(groups) > 1 and not c.across_backends:
        fastest = "; ".join(
            f"{basis}: {rows[0].label} ({_tps(rows[0], c.streams)} tokens/s)" for basis, rows in groups.items()
        )
        return Recommendation(
            None,
            f"The candidates' tokens/s were measured by different backends or machines, so "
            f"the fastest cannot be named (fastest of each: {fastest}). Choose one with --backend, "
            f"or rank across them with --across-backends.",
            [f"{a.row.label} ({a.row.run_id}): {a.row.speed_basis}" for a in pool],
            assessments,
        )
    best = pool[0]
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
            others.append(f"{a.row.label} ({a.row.run_id}): excluded — " + "; ".join(a.excluded))
        elif accurate and a.worse_on:
            others.append(
                f"{a.row.label} ({a.row.run_id}): significantly worse than {sel.baseline_method} on "
                + "; ".join(a.worse_on)
            )
        elif accurate and a.not_compared:
            others.append(
                f"{a.row.label} ({a.row.run_id}): accuracy not compared with {sel.baseline_method} on "
                + ", ".join(a.not_compared)
                + ", so it cannot count as within noise"
            )
        else:
            others.append(
                f"{a.row.label} ({a.row.run_id}): slower — {_tps(a.row, c.streams)} vs "
                f"{_tps(best.row, c.streams)} tokens/s at {_streams(c.streams)}"
            )
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


def _describe(a: Assessment, sel: Selection, c: Constraints) -> str:
    acc = a.row.mean_acc(sel.tasks)
    parts = [
        f"needs {a.memory_gb:.3g} GB ({a.memory_basis})" if a.memory_gb is not None else "memory not measured",
        f"mean accuracy {acc:.1%}" if acc is not None else "accuracy not measured",
        f"{_tps(a.row, c.streams)} tokens/s at {_streams(c.streams)}",
    ]
    if c.fine_tune:
        parts.append(f"{QLORA_LIBRARY}: QLoRA-ready")
    return ", ".join(parts)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench recommend", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-memory-gb", type=_number(gt=0), help="GPU memory budget (GB)")
    p.add_argument(
        "--min-accuracy", type=_number(ge=0, le=100), help="minimum mean accuracy over tasks (0.5 or 50 for 50%%)"
    )
    p.add_argument("--min-tokens-per-s", type=_number(ge=0), help="minimum output tokens/s")
    p.add_argument("--streams", type=int, default=1, choices=range(1, 1025), metavar="N",
                   help="concurrent streams the tokens/s floor applies to")  # fmt: skip
    p.add_argument("--fine-tune", action="store_true", help="the model will be fine-tuned (QLoRA: bitsandbytes)")
    p.add_argument(
        "--max-kl-mean",
        type=_number(ge=0),
        help="maximum mean KL divergence from the baseline's next-token distribution (nats/token)",
    )
    p.add_argument("--backend", help="only runs benchmarked by this backend (hf, vllm)")
    p.add_argument(
        "--across-backends",
        action="store_true",
        help="rank tokens/s measured by different backends or machines against each other anyway",
    )
    add_store_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = Store(args.tracking_uri)
    sel = store.select(args.experiment, args.sweep, args.filter, args.baseline)
    min_acc = args.min_accuracy / 100 if args.min_accuracy is not None and args.min_accuracy > 1 else args.min_accuracy
    rec = recommend(
        sel,
        store.compare(sel),
        Constraints(
            args.gpu_memory_gb,
            min_acc,
            args.min_tokens_per_s,
            args.streams,
            args.fine_tune,
            max_kl_mean=args.max_kl_mean,
            backend=args.backend,
            across_backends=args.across_backends,
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
        args.gpu_memory_gb,
        f"{min_acc:.1%}" if min_acc is not None else None,
        args.min_tokens_per_s,
        _streams(args.streams),
        args.max_kl_mean,
        "yes (QLoRA)" if args.fine_tune else "no",
        f", backend: {args.backend}" if args.backend else "",
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
