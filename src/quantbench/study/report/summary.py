"""The report's page (report.md) and the summary run it is logged to."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from quantbench import redact
from quantbench.study.report import serving
from quantbench.study.report.tables import Table
from quantbench.study.runs import SUMMARY_TAG, Selection, Store

ARTIFACT_ERRORS_TAG = "artifact_errors"  # on the summary run: artifacts the report could not read


def page(store: Store, sel: Selection, tables: list[Table], plot_kind: str, serving_plot: bool = False) -> str:
    """report.md: what the report was built from, each table with what it shows, and the plot."""
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
        "serving": serving.NOTE,
        "decision_matrix": 'Baseline excluded: the question is which quantization method. "Within noise" = no task '
        "significantly worse than the baseline.",
    }
    for t in tables:
        md += [f"## {t.title}", ""] + ([notes[t.name], ""] if t.name in notes else []) + [t.markdown(), ""]
    if serving_plot:
        md += [
            "## Serving: latency against throughput",
            "",
            "![Serving curves](serving.png)",
            "",
            "Each method's points from 1 user to the most (labelled with the concurrency): up is more output tokens/s "
            "per GPU, right is faster for each user. The table above gives where each curve leaves its SLO.",
            "",
        ]
    if plot_kind == "accuracy":
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
    return "\n".join(md)


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
