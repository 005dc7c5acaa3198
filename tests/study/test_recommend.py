"""`make recommend` on a real SQLite MLflow store of synthetic GPU runs: memory is judged by what serving a model
takes, and tokens/s are ranked only between runs measured the same way."""

from __future__ import annotations

import logging
import math

import pytest
from helpers.synthetic_store import correctness, log_run, make_store

from quantbench.study import recommend
from quantbench.study.runs import Store

N = 400
H100 = {"hardware": "h100", "host.gpu": "NVIDIA H100 80GB HBM3", "vllm_version": "vllm==0.26.0"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An 8B study on one H100: fp16 and GPTQ served by vLLM, AQLM by transformers' generate (vLLM 0.26 has no AQLM).
    GPTQ needed the whole bf16 model on the GPU to quantize (17 GB) but serves in 8.6 GB."""
    uri, client, exp = make_store(tmp_path_factory.mktemp("recommend_store") / "mlruns")
    vllm, hf = H100 | {"bench_backend": "vllm"}, H100 | {"bench_backend": "hf"}
    ids = {
        "fp16": log_run(
            client,
            exp,
            "fp16",
            job_num=0,
            tags=vllm,
            samples={"t1": correctness(N, 300)},
            metrics={
                "disk_gb": 16.06,
                "quantize_peak_mem_gb": 16.1,
                "serve_mem_gb": 18.3,
                "peak_mem_gb": 18.3,
                "tokens_per_s_1_stream": 153.8,
            },
        ),
        "gptq": log_run(
            client,
            exp,
            "gptq",
            job_num=1,
            tags=vllm,
            samples={"t1": correctness(N, 300, 2, 2)},
            metrics={
                "disk_gb": 5.73,
                "quantize_peak_mem_gb": 17.0,
                "serve_mem_gb": 8.6,
                "peak_mem_gb": 17.0,
                "tokens_per_s_1_stream": 260.2,
            },
        ),
        "aqlm_2bit": log_run(
            client,
            exp,
            "aqlm_2bit",
            job_num=2,
            tags=hf,
            samples={"t1": correctness(N, 300, 3, 3)},
            metrics={
                "disk_gb": 4.1,
                "quantize_peak_mem_gb": 16.5,
                "serve_mem_gb": 5.0,
                "peak_mem_gb": 16.5,
                "tokens_per_s_1_stream": 30.0,
            },
        ),
    }
    return uri, ids


def test_a_4bit_model_that_serves_within_the_budget_is_accepted_though_quantizing_it_needed_more(store, caplog):
    uri, ids = store
    with caplog.at_level(logging.INFO):
        rc = recommend.main(["--tracking-uri", uri, "--gpu-memory-gb", "10", "--backend", "vllm"])
    assert rc == 0
    assert f"gptq (run {ids['gptq']}): needs 8.6 GB (GPU memory to serve it, cuda_device_used)" in caplog.text
    assert "needs 18.3 GB (GPU memory to serve it, cuda_device_used) > 10 GB budget" in caplog.text


def test_tokens_per_s_of_different_backends_are_not_ranked_against_each_other(store):
    uri, ids = store
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    comps = st.compare(sel)
    rec = recommend.recommend(sel, comps, recommend.Constraints())
    assert rec.choice is None
    assert "tokens_per_s_1_stream cannot rank these runs: tokens_per_s_1_stream was measured on different bases" in (
        rec.why
    )
    assert (
        "vllm (vllm==0.26.0) on NVIDIA H100 80GB HBM3; 100 prompt + 250 tokens: gptq (260.2), fp16 (153.8)" in rec.why
    )
    assert "hf (transformers 5.17.0, torch 2.13.0) on NVIDIA H100 80GB HBM3; 100 prompt + 250 tokens: " in rec.why
    assert "aqlm_2bit (30)" in rec.why
    within = recommend.recommend(sel, comps, recommend.Constraints(max_serve_mem_gb=10, backend="vllm"))
    assert within.choice.row.run_id == ids["gptq"]
    assert any("aqlm_2bit" in o and "benchmarked by hf, not vllm" in o for o in within.others)
    anyway = recommend.recommend(sel, comps, recommend.Constraints(max_serve_mem_gb=10, rank_across_backends=True))
    assert anyway.choice.row.run_id == ids["gptq"]


def test_one_backend_on_two_machines_is_two_bases(store, tmp_path):
    uri, client, exp = make_store(tmp_path / "mlruns")
    for i, gpu in enumerate(("NVIDIA H100 80GB HBM3", "NVIDIA H200")):
        log_run(
            client,
            exp,
            "gptq",
            job_num=i,
            tags={"bench_backend": "vllm", "host.gpu": gpu},
            samples={"t1": correctness(N, 300)},
            metrics={"tokens_per_s_1_stream": 260.0 + 60 * i},
        )
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    assert recommend.recommend(sel, st.compare(sel), recommend.Constraints()).choice is None


def test_a_kl_ceiling_keeps_only_runs_that_stay_close_to_the_baseline(tmp_path):
    uri, client, exp = make_store(tmp_path / "mlruns")
    for i, (method, kl) in enumerate((("gptq", 3e-4), ("aqlm_2bit", 5e-3))):
        log_run(
            client,
            exp,
            method,
            job_num=i,
            samples={"t1": correctness(N, 300)},
            metrics={"quality_kl_mean": kl, "tokens_per_s_1_stream": 100.0 * (i + 1)},
        )
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    rec = recommend.recommend(sel, st.compare(sel), recommend.Constraints(max_kl_mean=1e-3))
    assert rec.choice.row.method == "gptq"  # aqlm is faster, but its distribution moved too far
    assert any("quality_kl_mean 0.005 > max 0.001" in o for o in rec.others)


def test_the_memory_table_shows_what_quantizing_took_beside_what_serving_takes(store, tmp_path):
    import csv

    from quantbench.study import report

    uri, _ = store
    assert report.main(["--tracking-uri", uri, "--out", str(tmp_path), "--no-log"]) == 0
    with (tmp_path / "memory.csv").open() as fh:
        gptq = next(r for r in csv.DictReader(fh) if r["method"] == "gptq")
    assert (float(gptq["quantize_peak_mem_gb"]), float(gptq["serve_mem_gb"])) == (17.0, 8.6)


def test_a_run_without_accuracy_is_not_within_noise_of_the_baseline(tmp_path):
    """A task whose metrics were not read (no accuracy logged) or an accuracy logged as NaN: the run was never compared
    with the baseline, so it cannot count as 'not significantly worse' and win on speed alone."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    log_run(
        client, exp, "fp16", job_num=0, samples={"t1": correctness(N, 300)}, metrics={"tokens_per_s_1_stream": 50.0}
    )
    log_run(client, exp, "gptq", job_num=1, samples={"t1": correctness(N, 300, 2, 2)},
            metrics={"tokens_per_s_1_stream": 100.0})  # fmt: skip
    log_run(client, exp, "awq", job_num=2, tasks=["t1"], metrics={"tokens_per_s_1_stream": 300.0})
    log_run(client, exp, "rtn", job_num=3, tasks=["t1"], metrics={"tokens_per_s_1_stream": 200.0, "t1_acc": math.nan})
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    rec = recommend.recommend(sel, st.compare(sel), recommend.Constraints())
    assert rec.choice.row.method == "gptq"  # slower than awq and rtn, but the only one compared and within noise
    assert any("awq" in o and "accuracy not compared with fp16 on t1 (no t1_acc accuracy)" in o for o in rec.others)
    assert any("rtn" in o and "t1 (t1_acc is nan (not a measurement) accuracy)" in o for o in rec.others)


def test_one_memory_budget_is_not_applied_to_figures_that_measured_different_things(store):
    uri, ids = store
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    rec = recommend.recommend(sel, st.compare(sel), recommend.Constraints(max_serve_mem_gb=10))
    assert rec.choice is None
    assert "memory figures measured different things" in rec.why
    assert "serve_mem_gb: cuda_device_used: fp16, gptq; serve_mem_gb: cuda_allocator: aqlm_2bit" in rec.why
    (smallest,) = [m for m in recommend.decision_matrix(sel, st.compare(sel)) if m["constraint"].startswith("Tight")]
    assert smallest["recommended"] == "none measured" and "not comparable" in smallest["evidence"]


@pytest.mark.parametrize(
    "args", [["--gpu-memory-gb", "nan"], ["--gpu-memory-gb", "-4"], ["--max-kl-mean", "inf"], ["--streams", "0"]]
)
def test_a_constraint_out_of_range_is_refused_before_the_store_is_read(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        recommend.main(["--tracking-uri", "sqlite:////nonexistent/mlflow.db", *args])
    err = capsys.readouterr().err  # an alias's flag is named beside its own: --max-serve-mem-gb/--gpu-memory-gb
    assert exit_.value.code == 2 and "error: argument --" in err and f"{args[0]}:" in err
