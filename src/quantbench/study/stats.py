"""Statistics for comparing two evaluations of the same documents: is a quantized model's accuracy really lower?

Accuracies of two models on one benchmark are *paired* (same questions), so the honest uncertainty of their
difference comes from resampling questions, not from adding two independent standard errors: most questions
are answered alike by both models, and the paired test sees that. Everything here is pure numpy, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

WITHIN_NOISE = "within noise"
WORSE = "significantly worse"
BETTER = "significantly better"


@dataclass(frozen=True)
class Difference:
    """candidate − baseline accuracy (fractions, not points) with a confidence interval."""

    delta: float
    low: float
    high: float
    n: int  # documents compared
    method: str  # "paired bootstrap" or "unpaired normal"
    mcnemar_p: float | None = None

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    """A difference is significant only when its confidence interval excludes zero."""
    if high < 0:
        return WORSE
    if low > 0:
        return BETTER
    return WITHIN_NOISE


# run id -> task -> the run's accuracy difference from the sweep's baseline (runs.Store.compare builds it): what the
# report's accuracy table, the registry policy and recommend all judge runs by.
Comparisons = dict[str, dict[str, Difference]]


def worse_tasks(run_id: str | None, comparisons: Comparisons) -> list[str]:
    """The tasks on which a run is significantly worse than the baseline, each with its difference and interval."""

    def pp(x: float) -> str:
        return f"{100 * x:+.1f} pp"

    return [
        f"{task} ({pp(d.delta)} [{pp(d.low)}, {pp(d.high)}])"
        for task, d in comparisons.get(run_id or "", {}).items()
        if d.verdict == WORSE
    ]


def pair_by_doc(baseline: Iterable[dict], candidate: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document correctness of both runs on the documents both scored, matched by (task, doc_id): a group's rows
    name the subtask they come from (MMLU's 57 subjects each number their documents from 0), a task's need not.

    A document seen several times (one entry per calibration repeat) counts once, with its mean correctness.
    """

    def by_doc(rows: Iterable[dict]) -> dict[tuple[str | None, int], float]:
        sums: dict[tuple[str | None, int], list[float]] = {}
        for row in rows:
            sums.setdefault((row.get("task"), int(row["doc_id"])), []).append(float(row["acc"]))
        return {doc: sum(v) / len(v) for doc, v in sums.items()}

    a, b = by_doc(baseline), by_doc(candidate)
    common = sorted(a.keys() & b.keys(), key=lambda k: (k[0] or "", k[1]))
    return np.array([a[d] for d in common], dtype=float), np.array([b[d] for d in common], dtype=float)


def paired_bootstrap(
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """Percentile bootstrap CI of mean(candidate − baseline), resampling documents with replacement.

    The per-document differences take few distinct values ({-1, 0, 1} for 0/1 scores), and the mean of a
    resample depends only on how often each value was drawn, so a multinomial draw over the distinct values
    is exactly the same bootstrap as resampling indices — at O(n_boot × values) instead of O(n_boot × n),
    which keeps MMLU-sized (14k) benchmarks instant.
    """
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("no paired samples to compare")
    diffs = b - a
    values, counts = np.unique(diffs, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    means = draws @ values / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p = mcnemar(a, b) if np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all() else None
    return Difference(float(diffs.mean()), float(low), float(high), n, "paired bootstrap", p)


def unpaired_normal(
    acc_a: float, se_a: float, acc_b: float, se_b: float, *, confidence: float = 0.95, n: int = 0
) -> Difference:
    """Fallback when per-sample results are missing: normal CI from the two lm-eval standard errors.

    Wider than the paired interval (it ignores the correlation between the two models), so it errs towards
    "within noise".
    """
    z = _normal_quantile(0.5 + confidence / 2)
    delta = acc_b - acc_a
    half = z * math.hypot(se_a, se_b)
    return Difference(delta, delta - half, delta + half, n, "unpaired normal")


def mcnemar(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value: only documents the two models disagree on carry information."""
    a = np.asarray(baseline) > 0.5
    b = np.asarray(candidate) > 0.5
    lost = int(np.sum(a & ~b))
    gained = int(np.sum(~a & b))
    k, m = min(lost, gained), lost + gained
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x smaller is better, y larger is better),
    ordered by x: the frontier of the size/accuracy trade-off."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF by bisection on erf (no scipy needed for one number)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
