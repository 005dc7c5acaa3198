"""The report's Pareto plot: disk size against accuracy, or against tokens/s where no run has an accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantbench.names import stream_label
from quantbench.study import stats
from quantbench.study.runs import RunRow, Selection, speed_groups


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
