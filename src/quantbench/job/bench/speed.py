"""What every benchmark backend shares: the plan it runs, the result it returns, and one formula that turns timed
repeats into end-to-end and decode-only tokens/s and time to first token. Each backend's own knobs live in its
module (bench/backends/)."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from quantbench.names import stream_label

log = logging.getLogger(__name__)


@dataclass
class BenchPlan:
    backend: str
    prompt_tokens: int
    output_tokens: int
    streams: list[int]
    warmup: int
    repeats: int
    # each backend's knobs by its name (bench.<name>: plan.knobs["vllm"]); bench.plan reads every backend's
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)  # every timing, for the benchmark JSON artifact
    # The tensors the backend held in memory while it decoded (name -> (dtype, shape, bytes)), where it ran an
    # in-memory model: the roofline counts these rather than the stored ones (a decompressed format reads more).
    loaded: dict[str, tuple[str, list[int], int]] | None = None
    # metrics per point of a sweep, logged with MLflow's step (bench=serving: step = concurrency)
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    artifacts: dict[str, object] = field(default_factory=dict)  # more JSON artifacts: file -> content


def summarize(prefix: str, n_streams: int, values: list[float]) -> dict[str, float]:
    """median, min and max of repeated measurements, named `<prefix>_<n>_stream(s)[_min|_max]`."""
    label = f"{prefix}_{stream_label(n_streams)}"
    return {label: statistics.median(values), f"{label}_min": min(values), f"{label}_max": max(values)}


def decode_tokens_per_s(
    n_streams: int, output_tokens: int, seconds: list[float], ttft: list[float]
) -> tuple[list[float | None], str | None]:
    """Decode-only tokens/s of each repeat: the output tokens after the first, n * (output_tokens - 1), over the
    time after the first token, the repeat's full generation less the time to first token of its paired TTFT run.

    End-to-end tokens/s also pays for the prefill; decoding alone is what the bandwidth roofline bounds. A repeat
    whose generation took no longer than its first token, or a plan of one output token, has no decode time to divide
    by: its value is None and the second element says why (None when every repeat has a figure).
    """
    if output_tokens == 1:
        return [None] * len(seconds), "output_tokens=1: no token is decoded after the first"
    values: list[float | None] = []
    short = []
    for i, (total, first) in enumerate(zip(seconds, ttft, strict=True)):
        if total <= first:
            values.append(None)
            short.append(f"repeat {i + 1}: {total:.4g} s in all, {first:.4g} s to the first token")
        else:
            values.append(n_streams * (output_tokens - 1) / (total - first))
    if short:
        return values, "the generation took no longer than its first token (" + "; ".join(short) + ")"
    return values, None


def speed_metrics(runs: list[dict], output_tokens: int) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and tags from each stream count's timed repeats (dicts with `streams`, `seconds`, `ttft_s`), the same
    for every backend: `tokens_per_s_<label>` end to end (output tokens over the whole generation, what
    `vllm bench throughput` reports), `decode_tokens_per_s_<label>` (see `decode_tokens_per_s`) and `ttft_s_<label>`,
    each as median, min and max.

    Adds the per-repeat `tokens_per_s` and `decode_tokens_per_s` to each run (for the benchmark JSON). A stream count
    where any repeat has no decode figure gets no decode metric (a median of the rest would be biased); the tag
    `decode_tokens_per_s_unavailable` says why.
    """
    metrics: dict[str, float] = {}
    missing = []
    for run in runs:
        n = int(run["streams"])
        run["tokens_per_s"] = [n * output_tokens / s for s in run["seconds"]]
        run["decode_tokens_per_s"], why = decode_tokens_per_s(n, output_tokens, run["seconds"], run["ttft_s"])
        metrics.update(summarize("tokens_per_s", n, run["tokens_per_s"]))
        if why is None:
            metrics.update(summarize("decode_tokens_per_s", n, run["decode_tokens_per_s"]))
        else:
            run["decode_unavailable"] = why
            missing.append(f"{stream_label(n)}: {why}")
            log.warning("No decode-only tokens/s at %s: %s", stream_label(n), why)
        metrics.update(summarize("ttft_s", n, run["ttft_s"]))
    tags = {"decode_tokens_per_s_unavailable": "; ".join(missing)[:500]} if missing else {}
    return metrics, tags
