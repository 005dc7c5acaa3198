"""`repeats`: calibrated methods are re-quantized with new calibration seeds and their accuracy is logged as
mean and spread; uncalibrated methods are not repeated, since a deterministic rerun measures nothing."""

from __future__ import annotations

import statistics

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_a_calibrated_method_is_requantized_per_seed_and_reports_mean_and_spread(tmp_path, tiny_root):
    store = run_cli(
        "method=gptq",
        "repeats=2",
        "bench=none",
        "eval.limit=120",
        "calibration.num_samples=16",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
    )
    (run,) = store.runs()
    m = run.data.metrics
    assert m["acc_repeats"] == 2
    for task in ("tiny_facts", "tiny_arith"):
        history = store.client.get_metric_history(run.info.run_id, f"{task}_acc_repeat")
        assert sorted(h.step for h in history) == [0, 1]
        values = [h.value for h in history]
        assert m[f"{task}_acc_mean"] == pytest.approx(sum(values) / 2)
        assert m[f"{task}_acc_std"] == pytest.approx(statistics.stdev(values))
        assert m[f"{task}_acc"] == next(h.value for h in history if h.step == 0)  # the artifact's own score
    # the second calibration seed gave another model, not the same one scored twice
    nll = {h.step: h.value for h in store.client.get_metric_history(run.info.run_id, "fingerprint_nll_repeat")}
    assert sorted(nll) == [0, 1] and nll[0] == m["fingerprint_nll"]
    assert nll[0] != nll[1]


def test_an_uncalibrated_method_is_not_repeated(tmp_path, tiny_root):
    store = run_cli(
        "method=fp16", "repeats=3", "bench=none", "eval.limit=50", mlruns=tmp_path / "mlruns", workdir=tmp_path
    )
    (run,) = store.runs()
    assert "acc_repeats" not in run.data.metrics and "tiny_facts_acc" in run.data.metrics
