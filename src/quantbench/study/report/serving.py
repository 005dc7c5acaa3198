"""The report's serving section (runs of bench=serving): each method's latency-throughput curve in one figure (output
tokens/s per GPU against tokens/s per user, one point per concurrency, as vLLM's `bench sweep` Pareto plot), and a
table of goodput at each run's SLO with its energy and cost per million output tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantbench.study.report.tables import MISSING, Table, _fmt
from quantbench.study.runs import RunRow, Selection, Store

BACKEND = "serving"


@dataclass
class Curve:
    label: str
    concurrency: list[int]
    per_gpu: list[float]  # output tokens/s of the server over the GPUs it ran on (one per job)
    per_user: list[float]  # output tokens/s / concurrency


def serving_rows(sel: Selection) -> list[RunRow]:
    return [r for r in sel.finished if r.tags.get("bench_backend") == BACKEND]


def curves(store: Store, sel: Selection) -> list[Curve]:
    """Each serving run's points, read from its metric history (step = concurrency)."""
    out = []
    for r in serving_rows(sel):
        history = {
            name: {m.step: m.value for m in store.client.get_metric_history(r.run_id, name)}
            for name in ("serve_output_tokens_per_s", "serve_tokens_per_s_per_user")
        }
        steps = sorted(set(history["serve_output_tokens_per_s"]) & set(history["serve_tokens_per_s_per_user"]))
        gpus = max(1, int(float(r.params.get("hardware.job_gpus") or 1))) if r.on_gpu else 1
        out.append(
            Curve(
                r.label,
                steps,
                [history["serve_output_tokens_per_s"][s] / gpus for s in steps],
                [history["serve_tokens_per_s_per_user"][s] for s in steps],
            )
        )
    return out


def curve_plot(drawn: list[Curve], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for curve in drawn:
        (line,) = ax.plot(curve.per_user, curve.per_gpu, marker="o", label=curve.label)
        for c, x, y in zip(curve.concurrency, curve.per_user, curve.per_gpu):
            ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per GPU (the whole server on CPU)")
    ax.set_title("Latency-throughput: one point per concurrency (labelled)")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def goodput_table(sel: Selection) -> Table:
    """Goodput at each run's SLO (the highest concurrency whose p99 TTFT and ITL meet it), its throughput, joules per
    output token and cost per million output tokens there; a missing figure says why."""
    t = Table(
        "serving",
        "(s) Serving under load: goodput at the SLO",
        ["Method", "SLO", "Users at SLO", "tokens/s at SLO", "J / output token", "Cost / M tokens", "Backend"],
    )
    for r in serving_rows(sel):
        m, tags = r.metrics, r.tags
        users = m.get("serve_goodput_concurrency")
        energy = m.get("serve_goodput_joules_per_output_token")
        cost = m.get("serve_goodput_cost_per_million_tokens")
        t.cells.append(
            [
                r.label,
                tags.get("serve_slo", MISSING),
                MISSING if users is None else f"{users:.0f}" + (" (none met it)" if users == 0 else ""),
                _fmt(m.get("serve_goodput_output_tokens_per_s"), ".1f"),
                _fmt(energy, ".4g") if energy is not None else f"{MISSING} ({tags.get('energy_unavailable', 'n/a')})",
                _fmt(cost, ".4g") if cost is not None else f"{MISSING} ({tags.get('cost_unavailable', 'n/a')})",
                f"{tags.get('vllm_version', '?')}; {tags.get('vllm_linear_kernel', '?')}",
            ]
        )
        t.records.append(
            {
                "method": r.label,
                "run_id": r.run_id,
                "slo": tags.get("serve_slo"),
                "goodput_concurrency": users,
                "goodput_output_tokens_per_s": m.get("serve_goodput_output_tokens_per_s"),
                "joules_per_output_token": energy,
                "energy_unavailable": tags.get("energy_unavailable"),
                "cost_per_million_tokens": cost,
                "cost_unavailable": tags.get("cost_unavailable"),
            }
        )
    return t


NOTE = (
    "From `vllm bench serve` against vLLM's OpenAI server (bench=serving), one point per concurrency. Goodput: the "
    "highest concurrency whose p99 TTFT and p99 ITL meet the run's SLO with no failed request; energy over the "
    "generator's measured window from NVML (GPU) or RAPL (CPU), else the reason; cost from hardware.cost_per_hour. "
    "Compare within one machine and backend only."
)
