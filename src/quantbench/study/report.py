"""`make report`: the seed's three tables (memory, accuracy, throughput), its decision matrix and a Pareto plot,
rebuilt from the runs of one sweep in MLflow and logged back as a summary run.

Accuracy differences come with a paired-bootstrap CI over the documents both runs scored, so "−0.3 pp" is
called noise when it is noise. Runs that FAILED, never finished or never ran are listed as such; a missing
number is shown as "—", never as 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from quantbench import redact
from quantbench.study import recommend, stats
from quantbench.errors import ConfigError
from quantbench.names import stream_label
from quantbench.study.runs import ROOT, SUMMARY_TAG, RunRow, Selection, Store, add_store_args, speed_groups

log = logging.getLogger(__name__)

MISSING = "—"
ARTIFACT_ERRORS_TAG = "artifact_errors"  # on the summary run: artifacts the report could not read
STATUS_CHARS = 160  # a failure reason can be a traceback; the Markdown cell keeps its start, the CSV all of it


@dataclass
class Table:
    """One table, twice: formatted for people (Markdown) and raw for machines (CSV)."""

    name: str
    title: str
    headers: list[str]
    cells: list[list[str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        def clean(cell: str) -> str:
            return " ".join(str(cell).split()).replace("|", "\\|")

        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in self.cells]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> Path:
        keys: dict[str, None] = {}
        for rec in self.records:
            keys.update(dict.fromkeys(rec))
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(keys))
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in self.records)
        return path


def memory_table(sel: Selection) -> Table:
    base_disk = sel.baseline.metrics.get("disk_gb") if sel.baseline else None
    t = Table(
        "memory",
        "(a) Memory footprint",
        [
            "Method",
            "Status",
            "Bits/weight",
            "Disk (GB)",
            f"Δ vs {sel.baseline_method}",
            "Weights (GB)",
            "Serving mem (GB)",
            "Quantize peak (GB)",
            "Eval peak (GB)",
            "Peak mem (GB)",
            "Quantize (s)",
            "Run",
        ],
    )
    for r in sel.rows:
        disk = r.metrics.get("disk_gb")
        delta = disk - base_disk if disk is not None and base_disk is not None else None
        if sel.is_baseline(r):
            delta_cell = "baseline"
        elif delta is None:
            delta_cell = MISSING
        else:
            delta_cell = f"{delta:+.4g} GB ({100 * delta / base_disk:+.0f} %)" if base_disk else f"{delta:+.4g} GB"
        t.cells.append(
            [
                r.label,
                _status(r),
                _fmt(r.metrics.get("bits_per_weight"), ".2f"),
                _fmt(disk, ".4g"),
                delta_cell,
                _fmt(r.metrics.get("weight_gb"), ".4g"),
                _mem(r, "serve_mem_gb"),
                _mem(r, "quantize_peak_mem_gb"),
                _mem(r, "eval_peak_mem_gb"),
                _mem(r, "peak_mem_gb"),
                _fmt(r.metrics.get("quantize_s"), ".0f"),
                r.short_id,
            ]
        )
        t.records.append(
            {
                "method": r.label,
                "run_id": r.run_id,
                "status": r.status,
                "failure_reason": r.failure_reason,
                "bits_per_weight": r.metrics.get("bits_per_weight"),
                "disk_gb": disk,
                "delta_disk_gb": delta,
                "weight_gb": r.metrics.get("weight_gb"),
                "serve_mem_gb": r.metrics.get("serve_mem_gb"),
                "quantize_peak_mem_gb": r.metrics.get("quantize_peak_mem_gb"),
                "eval_peak_mem_gb": r.metrics.get("eval_peak_mem_gb"),
                "peak_mem_gb": r.metrics.get("peak_mem_gb"),
                "quantize_s": r.metrics.get("quantize_s"),
                **{f"{k}_basis": r.mem_basis(k) if k in r.metrics else None for k in MEMORY_FIGURES},
            }
        )
    return t


MEMORY_FIGURES = ("serve_mem_gb", "quantize_peak_mem_gb", "eval_peak_mem_gb", "peak_mem_gb")
MEM_SHORT = {"job_process_rss": "job RSS", "engine_process_rss": "engine RSS", "cuda_allocator": "CUDA allocator",
             "cuda_device_used": "GPU used"}  # fmt: skip


def _mem(r: RunRow, name: str) -> str:
    """A memory figure with what it measured: figures of different kinds do not compare."""
    value = r.metrics.get(name)
    if value is None:
        return MISSING
    basis = r.mem_basis(name)
    return f"{value:.3g} ({' + '.join(MEM_SHORT.get(b, b) for b in basis.split(' + '))})"


def accuracy_table(sel: Selection, comparisons: stats.Comparisons) -> Table:
    t = Table(
        "accuracy",
        "(b) Accuracy",
        [
            "Method",
            "Task",
            "Accuracy ± stderr",
            "Normalized acc ± stderr",
            "Mean ± std (repeats)",
            f"Δ vs {sel.baseline_method}",
            "95 % CI",
            "McNemar p",
            "Verdict",
            "Status",
        ],
    )
    for r in sel.rows:
        for task in sel.tasks:
            acc, se = r.acc(task), r.metrics.get(f"{task}_acc_stderr")
            norm, norm_se = r.metrics.get(f"{task}_acc_norm"), r.metrics.get(f"{task}_acc_norm_stderr")
            if r.random_weights:
                norm = norm_se = None
            mean, std = r.metrics.get(f"{task}_acc_mean"), r.metrics.get(f"{task}_acc_std")
            diff = comparisons.get(r.run_id or "", {}).get(task)
            if not r.ok:
                verdict = MISSING
            elif r.random_weights:
                verdict = "random weights: accuracy not meaningful"
            elif sel.is_baseline(r):
                verdict = "baseline"
            elif diff is not None:
                verdict = diff.verdict
            elif acc is None:
                verdict = "not evaluated"
            else:
                verdict = "no baseline to compare"
            n_rep = r.metrics.get("acc_repeats")  # how many seeds actually ran (uncalibrated methods run one)
            repeats = int(n_rep) if n_rep is not None else r.params.get("repeats", "?")
            t.cells.append(
                [
                    r.label,
                    task,
                    f"{100 * acc:.2f} % ± {100 * se:.2f}" if acc is not None and se is not None else _fmt(acc, ".2%"),
                    f"{100 * norm:.2f} % ± {100 * norm_se:.2f}"
                    if norm is not None and norm_se is not None
                    else _fmt(norm, ".2%"),
                    f"{100 * mean:.2f} ± {100 * std:.2f} (n={repeats})"
                    if mean is not None and std is not None
                    else MISSING,
                    f"{100 * diff.delta:+.2f} pp" if diff else MISSING,
                    f"[{100 * diff.low:+.2f}, {100 * diff.high:+.2f}] ({diff.method}, n={diff.n})" if diff else MISSING,
                    _fmt(diff.mcnemar_p if diff else None, ".3g"),
                    verdict,
                    _status(r),
                ]
            )
            t.records.append(
                {
                    "method": r.label,
                    "run_id": r.run_id,
                    "status": r.status,
                    "failure_reason": r.failure_reason,
                    "task": task,
                    "acc": acc,
                    "acc_stderr": se,
                    "acc_norm": norm,
                    "acc_norm_stderr": norm_se,
                    "acc_mean": mean,
                    "acc_std": std,
                    "repeats": repeats if mean is not None else None,
                    "delta": diff.delta if diff else None,
                    "ci_low": diff.low if diff else None,
                    "ci_high": diff.high if diff else None,
                    "ci_method": diff.method if diff else None,
                    "n_paired": diff.n if diff else None,
                    "mcnemar_p": diff.mcnemar_p if diff else None,
                    "verdict": verdict if verdict != MISSING else None,
                }
            )
    return t


def throughput_table(sel: Selection) -> Table:
    streams = sel.streams or [1, 8]
    roofline = {n for n in streams for r in sel.rows if f"roofline_fraction_{stream_label(n)}" in r.metrics}
    decode = {n for n in streams for r in sel.rows if f"decode_tokens_per_s_{stream_label(n)}" in r.metrics}
    headers = ["Method", "Status"]
    for n in streams:
        headers.append(f"tokens/s @ {n} stream{'s' if n > 1 else ''} (min–max)")
        if n in decode:
            headers.append(f"decode-only @ {n}")
        if n in roofline:
            headers.append(f"roofline @ {n}")
    groups = speed_groups(r for r in sel.rows if r.ok)
    title = "(c) Throughput"
    if len(groups) > 1:  # tokens/s compare only within a backend and machine: one block of rows per basis
        title += (
            f" — measured with {len(groups)} backends or machines; compare tokens/s within a group only: "
            + "; ".join(f"{basis}: {', '.join(r.label for r in rows)}" for basis, rows in groups.items())
        )
    tail = ["TTFT @ 1 (ms)", "Backend", "Kernel", "Engine start (s)"]
    tail += ["Bandwidth (GB/s)"] if roofline else []  # what each bound assumes: a datasheet's or the card's measured
    t = Table("throughput", title, headers + tail + ["Measured with"])
    order = [r for rows in groups.values() for r in rows] + [r for r in sel.rows if not r.ok]
    for r in order:
        row, rec = (
            [r.label, _status(r)],
            {"method": r.label, "run_id": r.run_id, "status": r.status, "failure_reason": r.failure_reason},
        )
        for n in streams:
            key = f"tokens_per_s_{stream_label(n)}"
            tps, lo, hi = (r.metrics.get(key + s) for s in ("", "_min", "_max"))
            row.append(MISSING if tps is None else f"{tps:.1f}" + (f" ({lo:.1f}–{hi:.1f})" if lo and hi else ""))
            rec |= {key: tps, key + "_min": lo, key + "_max": hi}
            if n in decode:
                dec = r.metrics.get(f"decode_{key}")
                row.append(_fmt(dec, ".1f"))
                rec[f"decode_{key}"] = dec
            if n in roofline:
                frac = r.metrics.get(f"roofline_fraction_{stream_label(n)}")
                roof = r.metrics.get(f"roofline_tokens_per_s_{stream_label(n)}")
                row.append(MISSING if frac is None else f"{frac:.0%}" + (f" of {roof:.0f}" if roof else ""))
                rec |= {f"roofline_fraction_{stream_label(n)}": frac, f"roofline_tokens_per_s_{stream_label(n)}": roof}
        ttft = r.metrics.get("ttft_s_1_stream")
        backend = r.tags.get("bench_backend", MISSING)
        if r.tags.get("bench_fallback_reason"):
            backend += f" (asked {r.tags.get('bench_requested_backend')}: {r.tags['bench_fallback_reason']})"
        kernel = r.tags.get("vllm_linear_kernel") or r.tags.get("eval_kernel")
        start = r.metrics.get("vllm_engine_start_s")
        row += [
            _fmt(ttft * 1000 if ttft is not None else None, ".1f"),
            backend,
            kernel or MISSING,
            _fmt(start, ".0f"),
        ]
        bandwidth = r.metrics.get("memory_bandwidth_gbs")
        if roofline:
            row.append(MISSING if bandwidth is None else f"{bandwidth:.0f} {r.tags.get('memory_bandwidth_source', '')}")
        row.append(r.speed_basis if r.ok else MISSING)
        rec |= {
            "ttft_s_1_stream": ttft,
            "speed_basis": r.speed_basis if r.ok else None,
            "bench_backend": r.tags.get("bench_backend"),
            "bench_fallback_reason": r.tags.get("bench_fallback_reason"),
            "kernel": kernel,
            "vllm_engine_start_s": start,
            "memory_bandwidth_gbs": bandwidth,
            "memory_bandwidth_source": r.tags.get("memory_bandwidth_source"),
        }
        t.cells.append(row)
        t.records.append(rec)
    return t


def matrix_table(sel: Selection, comparisons: stats.Comparisons) -> Table:
    t = Table(
        "decision_matrix",
        "Decision matrix (from this sweep's data)",
        ["Constraint", "Recommended (measured)", "Why", "Seed recommends", "Run"],
    )
    for m in recommend.decision_matrix(sel, comparisons):
        t.cells.append([m["constraint"], m["recommended"], m["evidence"], m["seed"], m["runs"][:8] or MISSING])
        t.records.append(m)
    return t


@dataclass
class PlotPoints:
    """What the Pareto plot shows: disk size against accuracy, or, where no run has an accuracy (the random-weight
    shapes), against tokens/s at one stream beside each run's bandwidth bound."""

    kind: str  # "accuracy" | "speed"
    rows: list[RunRow]
    labels: list[str]  # the run's label; on the speed plot the method and the kernel that served it
    xs: list[float]  # disk GB
    ys: list[float]  # mean accuracy (%) or tokens/s at 1 stream
    errors: list[float]  # accuracy: standard error of the mean (%); speed: none
    colours: list[float | None]  # accuracy: tokens/s at 1 stream; speed: none
    bounds: list[float | None]  # speed: the roofline bound at 1 stream
    frontier: list[int]  # indices of runs no other run beats on both axes (smaller and better)
    left_out: list[str]  # runs not plotted, and why
    note: str | None = None  # why there is no frontier


def plot_points(sel: Selection) -> PlotPoints:
    """The runs to plot and their frontier. Accuracy where any finished run has one; else speed, whose frontier is
    drawn only where every plotted run was measured with the same backend on the same machine."""
    sized = [r for r in sel.finished if "disk_gb" in r.metrics]
    kind = "accuracy" if any(r.mean_acc(sel.tasks) is not None for r in sized) else "speed"
    if kind == "accuracy":
        rows = [r for r in sized if r.mean_acc(sel.tasks) is not None]
        ys = [100 * r.mean_acc(sel.tasks) for r in rows]
        errors = [100 * (r.mean_acc_stderr(sel.tasks) or 0.0) for r in rows]
        colours, bounds = [r.tokens_per_s(1) for r in rows], [None] * len(rows)
    else:
        rows = [r for r in sized if r.tokens_per_s(1) is not None]
        ys = [r.tokens_per_s(1) for r in rows]
        errors, colours = [0.0] * len(rows), [None] * len(rows)
        bounds = [r.metrics.get(f"roofline_tokens_per_s_{stream_label(1)}") for r in rows]
    why = "no accuracy" if kind == "accuracy" else "no tokens/s at 1 stream"
    left_out = [f"{r.label} ({r.status_text.split(':')[0] if not r.ok else why})" for r in sel.rows if r not in rows]
    xs = [r.metrics["disk_gb"] for r in rows]
    note, frontier = None, stats.pareto_front(list(zip(xs, ys))) if rows else []
    if kind == "speed" and len(groups := speed_groups(rows)) > 1:
        note, frontier = f"no frontier: tokens/s measured with {len(groups)} backends or machines", []
    labels = [_plot_label(r, kind) for r in rows]
    return PlotPoints(kind, rows, labels, xs, ys, errors, colours, bounds, frontier, left_out, note)


def pareto_plot(sel: Selection, pts: PlotPoints, path: Path) -> Path:
    """Mean accuracy against disk size, coloured by tokens/s at 1 stream, with the size/accuracy frontier; for runs
    without accuracy (random-weight shapes), tokens/s at 1 stream against disk size beside the bandwidth bound, with
    the size/speed frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = pts.xs, pts.ys
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if pts.rows:
        if pts.kind == "accuracy":
            ax.errorbar(xs, ys, yerr=pts.errors, fmt="none", ecolor="0.6", elinewidth=1, capsize=3, zorder=1)
        _draw_markers(fig, ax, pts)
        span = max(xs) - min(xs) or max(xs) or 1.0
        ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.4 * span)
        ax.margins(y=0.12)
        if pts.kind == "speed":
            ax.set_ylim(bottom=0)
        right, bottom = ax.get_xlim()[1], ax.get_ylim()[0]
        _place_labels(ax, pts.labels, xs, ys)
        if pts.frontier:
            fx, fy = [xs[i] for i in pts.frontier], [ys[i] for i in pts.frontier]
            # The staircase from the axis floor through every frontier point to the right edge: everything
            # below/right of it is dominated (some run is at least as small and better).
            sx, sy = [fx[0], *fx, right], [bottom, *fy, fy[-1]]
            better = "faster" if pts.kind == "speed" else "more accurate"
            ax.step(
                sx,
                sy,
                where="post",
                color="crimson",
                linestyle="--",
                linewidth=1.5,
                zorder=2,
                label=f"Pareto frontier (smaller and {better})",
            )
            ax.fill_between(
                sx, bottom, sy, step="post", color="crimson", alpha=0.06, zorder=0, label="dominated region"
            )
            ax.scatter(fx, fy, s=420, facecolors="none", edgecolors="crimson", linewidths=1.2, zorder=2)
            ax.set_ylim(bottom=bottom)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    else:
        wanted = "accuracy" if pts.kind == "accuracy" else "tokens/s"
        ax.text(
            0.5, 0.5, f"no finished run with disk size and {wanted}", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("disk size (GB)")
    if pts.kind == "accuracy":
        ax.set_ylabel(f"mean accuracy over {', '.join(sel.tasks)} (%)")
        ax.set_title(f"{sel.experiment}, sweep {sel.sweep}: accuracy vs size")
    else:
        ax.set_ylabel("tokens/s at 1 stream (end to end, median)")
        ax.set_title(f"{sel.experiment}, sweep {sel.sweep}: speed vs size (no accuracy measured)")
    ax.grid(alpha=0.3)
    footer = ([f"not plotted: {', '.join(pts.left_out)}"] if pts.left_out else []) + ([pts.note] if pts.note else [])
    if footer:
        fig.text(0.01, 0.01, "; ".join(footer), fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _place_labels(ax, labels: list[str], xs: list[float], ys: list[float], gap: float = 0.045) -> None:
    """Each label just right of and above its point, in axes fractions; where points sit close together (the same
    size, near accuracies or speeds), labels are stacked downwards from the highest, `gap` apart, never overprinted,
    and a moved label stands further right, clear of its neighbours' markers, with a line to its point."""
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []  # (x, y) of the labels so far, axes fractions
    for i in sorted(range(len(labels)), key=lambda i: -ys[i]):
        nx, ny = (xs[i] - left) / (right - left), (ys[i] - bottom) / (top - bottom)
        y = ny + 0.015
        for px, py in sorted(placed, key=lambda p: -p[1]):
            if abs(nx - px) < 0.08 and y > py - gap:
                y = py - gap
        placed.append((nx, y))
        moved = y < ny + 0.015
        ax.annotate(
            labels[i],
            (xs[i], ys[i]),
            xytext=(nx + (0.08 if moved else 0.03), y),
            textcoords="axes fraction",
            fontsize=9,
            va="bottom",
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if moved else None,
        )


def _plot_label(r: RunRow, kind: str) -> str:
    """The run's label; on the speed plot, where the runs of one method differ by the kernel that served them, the
    method and that kernel ("gptq, Marlin" from the `vllm_linear_kernel` tag)."""
    kernel = r.tags.get("vllm_linear_kernel")
    if kind != "speed" or not kernel:
        return r.label
    first = kernel.split(", ")[0].rsplit(" x", 1)[0]
    scheme, _, chosen = first.rpartition(": ")
    first = scheme if chosen == "its own apply()" else chosen  # no kernel object: the method's name says it
    return f"{r.method}, {first.removesuffix('LinearKernel').removesuffix('LinearMethod')}"


def _draw_markers(fig, ax, pts: PlotPoints) -> None:
    """Accuracy: markers coloured and sized by tokens/s at 1 stream (grey where none). Speed: the measured tokens/s,
    and above each, hollow, the bandwidth bound of a decode step, joined by a thin line."""
    xs, ys = pts.xs, pts.ys
    if pts.kind == "speed":
        ax.scatter(xs, ys, s=90, c="tab:blue", edgecolors="black", linewidths=0.6, zorder=3, label="measured")
        bound = [(x, y, b) for x, y, b in zip(xs, ys, pts.bounds) if b]
        if bound:
            ax.vlines(
                [x for x, _, _ in bound],
                [y for _, y, _ in bound],
                [b for _, _, b in bound],
                colors="0.6",
                linewidth=1,
                zorder=1,
            )
            ax.scatter(
                [x for x, _, _ in bound],
                [b for _, _, b in bound],
                s=90,
                facecolors="none",
                edgecolors="tab:blue",
                linewidths=1.2,
                zorder=3,
                label="bandwidth bound (decode)",
            )
        return
    known = [(x, y, v) for x, y, v in zip(xs, ys, pts.colours) if v is not None]
    if known:
        top = max(v for _, _, v in known)
        sc = ax.scatter(
            [x for x, _, _ in known],
            [y for _, y, _ in known],
            c=[v for _, _, v in known],
            cmap="viridis",
            s=[60 + 240 * v / top for _, _, v in known],
            zorder=3,
            edgecolors="black",
            linewidths=0.6,
        )
        fig.colorbar(sc, ax=ax, label="tokens/s at 1 stream")
    if len(known) < len(xs):
        ax.scatter(
            [x for x, _, v in zip(xs, ys, pts.colours) if v is None],
            [y for _, y, v in zip(xs, ys, pts.colours) if v is None],
            c="lightgray",
            s=60,
            edgecolors="black",
            zorder=3,
            label="no tokens/s",
        )


def build(store: Store, sel: Selection, out: Path) -> list[Path]:
    """Write report.md, one CSV per table and pareto.png into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    comparisons = store.compare(sel)
    tables = [
        memory_table(sel),
        accuracy_table(sel, comparisons),
        throughput_table(sel),
        matrix_table(sel, comparisons),
    ]
    if any(k in r.metrics for r in sel.rows for k in QUALITY):
        windows = {r.run_id: w["kl_mean"] for r in sel.finished if (w := store.quality_windows(r)) and r.run_id}
        separation = separation_table(sel, windows)
        tables[2:2] = [quality_table(sel, windows)] + ([separation] if separation else [])
    files = [t.write_csv(out / f"{t.name}.csv") for t in tables]
    plotted = plot_points(sel)
    files.append(pareto_plot(sel, plotted, out / "pareto.png"))
    counts = {s: sum(r.status == s for r in sel.rows) for s in ("FINISHED", "FAILED", "MISSING")}
    base = sel.baseline
    md = [
        f"# quantbench report: {sel.experiment}, sweep {sel.sweep}",
        "",
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{redact.text(store.uri)}`: "
        f"{len(sel.rows)} runs "
        f"({counts['FINISHED']} finished, {counts['FAILED']} failed, {counts['MISSING']} missing, "
        f"{len(sel.rows) - sum(counts.values())} unfinished). Tasks: {', '.join(sel.tasks) or 'none'}.",
        "",
        f"Baseline: {sel.baseline_method}"
        + (f" (run `{base.run_id}`)." if base else ".")
        + (f" Note: {sel.baseline_note}" if sel.baseline_note else ""),
        "",
    ]
    if store.problems:
        md += ["**Artifacts that could not be read** (the summary run's tag `artifact_errors` lists them):", ""]
        md += [f"- {p}" for p in store.problems] + [""]
    notes = {
        "memory": "Each memory figure says what it measured: the job's or the vLLM engine's process RSS, CUDA's "
        "allocator peak in the job's process, or the GPU's used memory read device-wide while vLLM ran. Figures of "
        "different kinds do not compare.",
        "accuracy": "± is lm-eval's standard error. Δ is the method minus the baseline in percentage points; its 95 % CI "
        "comes from a paired bootstrap over the documents both runs scored (matched by doc_id, 10 000 "
        "resamples), or from the two standard errors when per-sample results are missing (unpaired "
        "normal). A difference is significant only when its CI excludes 0.",
        "quality": "On the same held-out text for every run (conf/quality): the KL divergence of the run's next-token "
        "distribution from the baseline's, per token (mean and 99th percentile), how often the most likely "
        "next token is the baseline's, and perplexity. These move long before multiple-choice accuracy "
        "does; the baseline's own row is 0 / 100 % by construction.",
        "quality_groups": "Runs in order of mean KL divergence, each compared with the next on the same held-out "
        'windows (paired bootstrap over windows, 10 000 resamples, 95 %): "separated" when the '
        "interval excludes 0. Groups are chains of runs not separated from their neighbour; two "
        "runs in one group may still differ from each other (within noise is not transitive).",
        "throughput": "Median end-to-end output tokens/s over the benchmark's repeats (prefill included, as `vllm bench "
        "throughput` reports), with the fastest and slowest repeat; decode-only = output tokens after "
        "the first over the time after the first token; roofline = decode-only tokens/s over the "
        "memory-bandwidth bound of a decode step (the run's roofline_speed_basis and "
        "roofline_bytes_basis tags say what each side counts).",
        "decision_matrix": 'Baseline excluded: the question is which quantization method. "Within noise" = no task '
        "significantly worse than the baseline.",
    }
    for t in tables:
        md += [f"## {t.title}", ""] + ([notes[t.name], ""] if t.name in notes else []) + [t.markdown(), ""]
    if plotted.kind == "accuracy":
        md += [
            "## Accuracy vs size",
            "",
            "![Pareto plot](pareto.png)",
            "",
            "Marker colour and size: tokens/s at 1 stream; error bars: standard error of the mean accuracy; "
            "dashed: the Pareto frontier (no other run is both smaller and more accurate).",
            "",
        ]
    else:
        md += [
            "## Speed vs size",
            "",
            "![Pareto plot](pareto.png)",
            "",
            "No run has an accuracy (random weights, or no eval), so the plot is tokens/s at 1 stream (end to end, "
            "median) against disk size; hollow: the memory-bandwidth bound of a decode step; dashed: the Pareto "
            "frontier (no other run is both smaller and faster), drawn only within one backend and machine.",
            "",
        ]
    (out / "report.md").write_text("\n".join(md))
    files.insert(0, out / "report.md")
    return files


QUALITY = ("quality_kl_mean", "quality_kl_p99", "quality_top1_agreement", "quality_ppl")


def quality_table(sel: Selection, windows: dict[str, list[float]]) -> Table:
    """Next-token quality against the baseline on held-out text (quantbench.job.quality), one row per run; the KL
    interval resamples the held-out windows (tokens within a window are not independent)."""
    t = Table(
        "quality",
        "(b2) Next-token quality vs the baseline",
        [
            "Method",
            "KL mean (nats)",
            "95 % CI (windows)",
            "KL p99",
            "Top-1 agreement",
            "Perplexity",
            "Tokens",
            "Status",
        ],
    )
    for r in sel.rows:
        m = {k: r.metrics.get(k) for k in QUALITY}
        kl = windows.get(r.run_id or "")
        ci = stats.paired_bootstrap([0.0] * len(kl), kl) if kl else None
        t.cells.append(
            [
                r.label,
                _fmt(m["quality_kl_mean"], ".3g"),
                f"[{ci.low:.3g}, {ci.high:.3g}] (n={ci.n})" if ci else MISSING,
                _fmt(m["quality_kl_p99"], ".3g"),
                _fmt(m["quality_top1_agreement"], ".2%"),
                _fmt(m["quality_ppl"], ".4g"),
                _fmt(r.metrics.get("quality_tokens"), ".0f"),
                _status(r),
            ]
        )
        t.records.append(
            {
                "method": r.label,
                "run_id": r.run_id,
                "status": r.status,
                **{k.removeprefix("quality_"): v for k, v in m.items()},
                "kl_ci_low": ci.low if ci else None,
                "kl_ci_high": ci.high if ci else None,
                "windows": ci.n if ci else None,
            }
        )
    return t


def separation_table(sel: Selection, windows: dict[str, list[float]]) -> Table | None:
    """Runs in order of KL divergence; each against the next with a paired bootstrap over the windows both scored:
    where the interval of the difference excludes 0 the next run starts a new group."""
    ranked = sorted(
        (r for r in sel.finished if windows.get(r.run_id or "")),
        key=lambda r: sum(windows[r.run_id]) / len(windows[r.run_id]),
    )
    if len(ranked) < 2:
        return None
    groups, cells, records = [[ranked[0].label]], [], []
    for a, b in zip(ranked, ranked[1:]):
        wa, wb = windows[a.run_id], windows[b.run_id]
        same = a.quality_windows_id == b.quality_windows_id and len(wa) == len(wb)
        d = stats.paired_bootstrap(wa, wb) if same else None
        separated = d is not None and d.low > 0
        verdict = ("separated" if separated else "within noise") if d else "not comparable: different held-out windows"
        if separated:
            groups.append([])
        groups[-1].append(b.label)
        cells.append(
            [
                f"{a.label} → {b.label}",
                f"{d.delta:+.3g}" if d else MISSING,
                f"[{d.low:+.3g}, {d.high:+.3g}] (n={d.n})" if d else MISSING,
                verdict,
            ]
        )
        records.append(
            {
                "from": a.label,
                "to": b.label,
                "from_run_id": a.run_id,
                "to_run_id": b.run_id,
                "delta_kl": d.delta if d else None,
                "ci_low": d.low if d else None,
                "ci_high": d.high if d else None,
                "windows": d.n if d else None,
                "verdict": verdict,
            }
        )
    order = " < ".join(" ≈ ".join(g) for g in groups)
    return Table(
        "quality_groups",
        f"(b3) What the KL divergence separates: {order}",
        ["Next in KL order", "Δ KL mean (nats)", "95 % CI (paired, windows)", "Verdict"],
        cells,
        records,
    )


def log_summary(store: Store, sel: Selection, files: list[Path]) -> str:
    """Log the report as the artifacts of the sweep's summary run (reused when the report is rebuilt)."""
    name = f"report-{sel.sweep}"
    client = store.client
    existing = [
        r
        for r in client.search_runs(
            [sel.experiment_id], filter_string=f"tags.`{SUMMARY_TAG}` = 'true'", max_results=1000
        )
        if r.info.run_name == name
    ]
    tags = {
        SUMMARY_TAG: "true",
        f"{SUMMARY_TAG}.sweep": sel.sweep,
        f"{SUMMARY_TAG}.baseline": sel.baseline_method,
        f"{SUMMARY_TAG}.runs": ",".join(r.run_id for r in sel.rows if r.run_id),
    }
    if store.problems:  # what the report could not read, and what it fell back to
        tags[ARTIFACT_ERRORS_TAG] = "; ".join(store.problems)[:5000]
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if not store.problems and ARTIFACT_ERRORS_TAG in existing[0].data.tags:
            client.delete_tag(run_id, ARTIFACT_ERRORS_TAG)  # an earlier build's errors are not this one's
    else:
        run_id = client.create_run(sel.experiment_id, run_name=name, tags=tags).info.run_id
    try:
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        for f in files:
            client.log_artifact(run_id, str(f), "report")
        for status in ("FINISHED", "FAILED", "MISSING"):
            client.log_metric(run_id, f"runs_{status.lower()}", sum(r.status == status for r in sel.rows))
    except Exception as exc:  # an upload that fails must not leave the summary run RUNNING forever
        client.set_tag(run_id, "failure_reason", f"logging the report failed: {type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _status(r: RunRow) -> str:
    return r.short_status(STATUS_CHARS)


def _fmt(v: float | None, spec: str) -> str:
    return MISSING if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench report", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>/ under the repo root)")
    p.add_argument("--no-log", action="store_true", help="write the files only, no summary run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = Store(args.tracking_uri)
    try:
        sel = store.select(args.experiment, args.sweep, args.filter, args.baseline)
    except ConfigError as exc:  # no such experiment or sweep: the paragraph, exit 1
        print(exc, file=sys.stderr)
        return 1
    out = args.out or ROOT / "reports" / args.experiment
    files = build(store, sel, out)
    sys.stdout.write((out / "report.md").read_text() + "\n")
    log.info("Wrote %s", ", ".join(str(f) for f in files))
    if not args.no_log:
        run_id = log_summary(store, sel, files)
        log.info("Logged them to summary run %s (report-%s) in experiment %s.", run_id, sel.sweep, sel.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
