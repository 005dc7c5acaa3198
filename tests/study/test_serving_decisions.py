"""`quantbench recommend` and the policy under bench=serving, on a real SQLite store of synthetic H100 serving runs:
an SLO constraint (p99 TTFT <= X ms at N concurrent users) and a "least cost per million tokens" objective, both
answered by one engine (policy.choose)."""

from __future__ import annotations

import logging

import pytest
from helpers.synthetic_store import correctness, log_run, make_store

from quantbench.study import policy, recommend
from quantbench.study.runs import Store

N = 400
SERVING = {"bench_backend": "serving", "host.gpu": "NVIDIA H100 80GB HBM3", "vllm_version": "vllm==0.26.0"}


def serving_metrics(ttft16: float, itl16: float, tps16: float, goodput: int, cost: float) -> dict[str, float]:
    """What bench=serving logs flat for 16 users and at its goodput point (the stepped history is not read here)."""
    return {
        "serve_ttft_p99_ms_c16": ttft16,
        "serve_itl_p99_ms_c16": itl16,
        "serve_output_tokens_per_s_c16": tps16,
        "serve_cost_per_million_tokens_c16": 2.5 / (tps16 * 3600) * 1e6,
        "serve_goodput_concurrency": goodput,
        "serve_goodput_cost_per_million_tokens": cost,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """fp16 serves 16 users fastest but misses 200 ms p99 TTFT there; gptq meets it; nf4 meets it more slowly.
    Within the SLO gptq serves the most users, so it is also the cheapest per million tokens."""
    uri, client, exp = make_store(tmp_path_factory.mktemp("serving_store") / "mlruns")
    figures = {
        "fp16": serving_metrics(ttft16=250, itl16=20, tps16=2600, goodput=8, cost=0.40),
        "gptq": serving_metrics(ttft16=150, itl16=18, tps16=2400, goodput=32, cost=0.18),
        "bnb_nf4": serving_metrics(ttft16=190, itl16=45, tps16=900, goodput=16, cost=0.77),
    }
    ids = {
        m: log_run(client, exp, m, job_num=i, tags=SERVING, samples={"t1": correctness(N, 300, i, i)}, metrics=f)
        for i, (m, f) in enumerate(figures.items())
    }
    return uri, ids


def decisions(uri: str, **asked) -> tuple[str | None, dict]:
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    rec = recommend.recommend(sel, st.compare(sel), policy.Constraints(**asked))
    return (rec.choice.row.method if rec.choice else None), {d.row.method: d for d in rec.assessments}


def test_an_slo_at_n_users_rejects_the_runs_that_miss_it(store):
    uri, _ = store
    won, by = decisions(uri, max_p99_ttft_ms=200, users=16, rank_by="serve_output_tokens_per_s_c16")
    assert won == "gptq"  # fp16 is faster at 16 users but misses the TTFT target there
    assert "serve_ttft_p99_ms_c16 250 > max 200" in by["fp16"].why
    won, by = decisions(uri, max_p99_ttft_ms=200, max_p99_itl_ms=40, users=16, rank_by="serve_output_tokens_per_s_c16")
    assert won == "gptq" and "serve_itl_p99_ms_c16 45 > max 40" in by["bnb_nf4"].why


def test_users_without_a_measured_point_are_a_reason_not_a_pass(store):
    uri, _ = store
    won, by = decisions(uri, max_p99_ttft_ms=200, users=64, rank_by="serve_goodput_cost_per_million_tokens")
    assert won is None
    assert "serve_ttft_p99_ms_c64" in by["gptq"].why


def test_least_cost_per_million_tokens_ranks_lower_first(store):
    uri, _ = store
    assert decisions(uri, rank_by="serve_goodput_cost_per_million_tokens")[0] == "gptq"
    assert not policy.higher_is_better("serve_cost_per_million_tokens_c16")
    assert policy.higher_is_better("serve_goodput_concurrency")


def test_recommend_flags_and_the_policy_keys_ask_the_same(store, caplog):
    uri, ids = store
    with caplog.at_level(logging.INFO):
        rc = recommend.main(["--tracking-uri", uri, "--max-p99-ttft-ms", "200", "--users", "16", "--least-cost"])
    assert rc == 0
    assert f"Recommendation: gptq (run {ids['gptq']})" in caplog.text
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    keys = ["max_p99_ttft_ms=200", "users=16", "rank_by=serve_cost_per_million_tokens_c16", "tie_tolerance=0",
            "tie_break=null", "max_acc_drop_points=null"]  # fmt: skip
    assert policy.choose(sel, st.compare(sel), policy.load_policy(keys)).winner.row.method == "gptq"
