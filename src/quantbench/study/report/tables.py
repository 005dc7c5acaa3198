"""The report's tables: memory, accuracy, quality, throughput and the decision matrix, each as Markdown and CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from quantbench.names import stream_label
from quantbench.study import stats
from quantbench.study.runs import RunRow, Selection, speed_groups

MISSING = "—"
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
            "LM head bits",
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
                _lm_head(r),
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
                "lm_head_bits_per_weight": r.metrics.get("lm_head_bits_per_weight"),
                "quantize_lm_head": r.tags.get("quantize_lm_head"),
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


def _lm_head(r) -> str:
    """The LM head's stored bits per weight, and whether the method quantized it (method.quantize_lm_head)."""
    bits = r.metrics.get("lm_head_bits_per_weight")
    quantized = r.tags.get("quantize_lm_head")
    cell = _fmt(bits, ".2f")
    return f"{cell} (quantized)" if quantized == "true" else cell


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
    tail = ["TTFT @ 1 (ms)", "Backend", "Kernel", "KV cache", "Engine start (s)"]
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
            r.tags.get("vllm_kv_cache_dtype", MISSING),  # vLLM's kv_cache_dtype; hf keeps the model's dtype
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
            "vllm_kv_cache_dtype": r.tags.get("vllm_kv_cache_dtype"),
            "vllm_engine_start_s": start,
            "memory_bandwidth_gbs": bandwidth,
            "memory_bandwidth_source": r.tags.get("memory_bandwidth_source"),
        }
        t.cells.append(row)
        t.records.append(rec)
    return t


def matrix_table(matrix: list[dict]) -> Table:
    """recommend.decision_matrix's rows as a table."""
    t = Table(
        "decision_matrix",
        "Decision matrix (from this sweep's data)",
        ["Constraint", "Recommended (measured)", "Why", "Seed recommends", "Run"],
    )
    for m in matrix:
        t.cells.append([m["constraint"], m["recommended"], m["evidence"], m["seed"], m["runs"][:8] or MISSING])
        t.records.append(m)
    return t


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


def _status(r: RunRow) -> str:
    return r.short_status(STATUS_CHARS)


def _fmt(v: float | None, spec: str) -> str:
    return MISSING if v is None else format(v, spec)
