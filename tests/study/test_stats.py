"""The statistics behind the report's verdicts, on synthetic per-document correctness vectors."""

from __future__ import annotations

import numpy as np
import pytest

from quantbench.study import stats


def vectors(n: int, n_correct: int, down: int, up: int) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([1] * n_correct + [0] * (n - n_correct), dtype=float)
    cand = base.copy()
    cand[:down] = 0
    cand[n_correct : n_correct + up] = 1
    return base, cand


def test_tiny_difference_is_within_noise():
    base, cand = vectors(400, 360, down=3, up=2)  # −0.25 pp
    d = stats.paired_bootstrap(base, cand)
    assert d.delta == pytest.approx(-0.0025)
    assert d.low < 0 < d.high
    assert d.verdict == stats.WITHIN_NOISE


def test_clear_drop_is_significantly_worse_and_clear_gain_better():
    base, cand = vectors(400, 360, down=40, up=2)  # −9.5 pp
    worse = stats.paired_bootstrap(base, cand)
    assert worse.high < 0 and worse.verdict == stats.WORSE
    assert worse.mcnemar_p is not None and worse.mcnemar_p < 1e-6
    better = stats.paired_bootstrap(cand, base)
    assert better.low > 0 and better.verdict == stats.BETTER


def test_identical_runs_are_within_noise():
    base, _ = vectors(100, 70, 0, 0)
    d = stats.paired_bootstrap(base, base)
    assert (d.delta, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.verdict == stats.WITHIN_NOISE and d.mcnemar_p == 1.0


def test_multinomial_bootstrap_matches_index_resampling():
    """The fast bootstrap must give the same interval as resampling document indices."""
    base, cand = vectors(300, 200, down=25, up=10)
    fast = stats.paired_bootstrap(base, cand, n_boot=20_000)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(base), size=(20_000, len(base)))
    slow = np.quantile((cand - base)[idx].mean(axis=1), [0.025, 0.975])
    assert fast.low == pytest.approx(slow[0], abs=0.004)
    assert fast.high == pytest.approx(slow[1], abs=0.004)


def test_pairing_matches_doc_ids_and_averages_repeats():
    base = [{"doc_id": 2, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 1.0}]
    cand = [{"doc_id": 0, "acc": 1.0}, {"doc_id": 1, "acc": 1.0}, {"doc_id": 1, "acc": 0.0}, {"doc_id": 9, "acc": 1.0}]
    a, b = stats.pair_by_doc(base, cand)
    assert a.tolist() == [0.0, 1.0] and b.tolist() == [1.0, 0.5]


def test_mcnemar_exact():
    assert stats.mcnemar([1] * 10, [0] * 10) == pytest.approx(2 / 1024)
    assert stats.mcnemar([1, 0], [0, 1]) == 1.0


def test_unpaired_fallback_uses_both_standard_errors():
    d = stats.unpaired_normal(0.60, 0.01, 0.58, 0.01)
    assert d.delta == pytest.approx(-0.02)
    assert d.high - d.delta == pytest.approx(1.96 * 0.01 * 2**0.5, rel=1e-3)
    assert d.verdict == stats.WITHIN_NOISE


def test_pareto_front():
    # (size, accuracy): the 4-bit point dominates the other 16-bit one; 2-bit is smallest.
    pts = [(16.1, 60.2), (5.7, 60.1), (5.7, 59.4), (4.1, 58.8), (16.1, 59.0)]
    assert stats.pareto_front(pts) == [3, 1, 0]


def test_rejects_unpaired_input():
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1])
