"""`make report` and `recommend` on a real SQLite MLflow store filled with synthetic runs.

The required check: runs whose accuracies differ by less than the noise are called indistinguishable, runs
that differ clearly are not; FAILED and missing runs show as such, never as zeros.
"""

from __future__ import annotations

import csv
import logging

import pytest
from helpers.synthetic_store import correctness, log_run, make_store

from quantbench.study import recommend, report
from quantbench.study.report import plot
from quantbench.study.runs import SUMMARY_TAG, Store

N1, N2 = 400, 300


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An old sweep sx (no fp16) and s0, then sweep s1: fp16, a within-noise 4-bit, a clearly worse (but fast) 2-bit, a FAILED
    run, and a method the sweep asked for that never logged a run."""
    root = tmp_path_factory.mktemp("report_store")
    uri, client, exp = make_store(root / "mlruns")
    log_run(client, exp, "bnb_nf4", sweep="sx", samples={"t1": correctness(N1, 350), "t2": correctness(N2, 240)})
    log_run(
        client,
        exp,
        "fp16",
        sweep="s0",
        samples={"t1": correctness(N1, 300), "t2": correctness(N2, 200)},
        metrics={"disk_gb": 9.9},
    )
    sweep_dir = root / "multirun" / "s1"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - method=fp16,bnb_nf4,aqlm_2bit,gptq,awq\n    - paths.mlruns=/x\n"
    )
    common = {"sweep": "s1", "sweep_dir": sweep_dir}
    ids = {
        "fp16": log_run(
            client,
            exp,
            "fp16",
            job_num=0,
            **common,
            samples={"t1": correctness(N1, 360), "t2": correctness(N2, 240)},
            tags={"memory_bandwidth_source": "measured"},
            metrics={
                "disk_gb": 16.1,
                "weight_gb": 16.0,
                "bits_per_weight": 16.0,
                "peak_mem_gb": 17.0,
                "tokens_per_s_1_stream": 322.0,
                "tokens_per_s_8_streams": 1660.0,
                "roofline_tokens_per_s_1_stream": 500.0,
                "roofline_fraction_1_stream": 0.644,
                "memory_bandwidth_gbs": 3002.2,
                "quality_kl_mean": 0.0,
                "quality_kl_p99": 0.0,
                "quality_top1_agreement": 1.0,
                "quality_ppl": 7.25,
                "quality_tokens": 4095.0,
            },
        ),
        "bnb_nf4": log_run(
            client,
            exp,
            "bnb_nf4",
            job_num=1,
            **common,
            samples={
                "t1": correctness(N1, 360, flips_down=3, flips_up=2),
                "t2": correctness(N2, 240, flips_down=1, flips_up=1),
            },
            tags={"quant_library": "bitsandbytes"},
            metrics={
                "disk_gb": 5.73,
                "weight_gb": 5.6,
                "bits_per_weight": 4.2,
                "peak_mem_gb": 6.5,
                "tokens_per_s_1_stream": 206.0,
                "tokens_per_s_8_streams": 1048.0,
                "quality_kl_mean": 0.0123,
                "quality_kl_p99": 0.094,
                "quality_top1_agreement": 0.951,
                "quality_ppl": 7.61,
                "quality_tokens": 4095.0,
            },
        ),
        "aqlm_2bit": log_run(
            client,
            exp,
            "aqlm_2bit",
            job_num=2,
            **common,
            samples={"t1": correctness(N1, 360, flips_down=60), "t2": correctness(N2, 240, 30)},
            metrics={
                "disk_gb": 4.08,
                "weight_gb": 3.9,
                "bits_per_weight": 2.1,
                "peak_mem_gb": 4.8,
                "tokens_per_s_1_stream": 400.0,
                "tokens_per_s_8_streams": 2000.0,
                "t1_acc_mean": 0.74,
                "t1_acc_std": 0.012,
                "acc_repeats": 3.0,
            },
        ),
        "gptq": log_run(
            client,
            exp,
            "gptq",
            job_num=3,
            **common,
            status="FAILED",
            failure_reason="CUDA out of memory while packing layer 3",
            tasks=["t1", "t2"],
        ),
    }
    return uri, ids, root


@pytest.fixture(scope="module")
def built(store):
    uri, ids, root = store
    out = root / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out)]) == 0
    return out


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_verdicts_follow_the_noise(built):
    rows = {(r["method"], r["task"]): r for r in read_csv(built / "accuracy.csv")}
    close = rows[("bnb_nf4", "t1")]
    assert float(close["delta"]) == pytest.approx(-1 / N1)
    assert close["verdict"] == "within noise" and float(close["ci_low"]) < 0 < float(close["ci_high"])
    assert rows[("bnb_nf4", "t2")]["verdict"] == "within noise"
    clear = rows[("aqlm_2bit", "t1")]
    assert float(clear["delta"]) == pytest.approx(-60 / N1)
    assert clear["verdict"] == "significantly worse" and float(clear["ci_high"]) < 0
    assert rows[("aqlm_2bit", "t2")]["verdict"] == "significantly worse"
    assert rows[("fp16", "t1")]["verdict"] == "baseline"
    assert close["ci_method"] == "paired bootstrap" and close["n_paired"] == str(N1)
    assert (clear["acc_mean"], clear["acc_std"], clear["repeats"]) == ("0.74", "0.012", "3")
    assert close["acc_mean"] == "" and close["repeats"] == ""  # no repeats: absent, not 0
    assert "74.00 ± 1.20 (n=3)" in (built / "report.md").read_text()


def test_failed_and_missing_runs_are_shown_as_such_not_as_zeros(built):
    md = (built / "report.md").read_text()
    assert "FAILED: CUDA out of memory while packing layer 3" in md
    assert "| awq | MISSING" in md  # asked for by multirun.yaml, never logged
    for name in ("memory", "accuracy", "throughput"):
        failed = [r for r in read_csv(built / f"{name}.csv") if r["method"] == "gptq"]
        assert failed and all(r["status"] == "FAILED" for r in failed)
        numeric = {
            k: v
            for r in failed
            for k, v in r.items()
            if k not in ("method", "run_id", "status", "failure_reason", "task", "repeats")
        }
        assert set(numeric.values()) <= {""}, numeric  # empty, never 0
    memory = {r["method"]: r for r in read_csv(built / "memory.csv")}
    assert memory["awq"]["status"] == "MISSING" and memory["awq"]["disk_gb"] == ""
    assert float(memory["bnb_nf4"]["delta_disk_gb"]) == pytest.approx(5.73 - 16.1)


def test_tables_and_plot(built):
    md = (built / "report.md").read_text()
    assert "sweep s1" in md  # the latest sweep by default, not s0
    for title in ("(a) Memory footprint", "(b) Accuracy", "(c) Throughput", "Decision matrix"):
        assert f"## {title}" in md
    assert "64%" in md and "roofline @ 1" in md  # roofline fraction shown where logged
    assert "3002 measured" in md  # and the bandwidth that bound assumes, with where it came from
    assert (built / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_quality_table_shows_divergence_from_the_baseline_and_no_numbers_where_none_were_measured(built):
    rows = {r["method"]: r for r in read_csv(built / "quality.csv")}
    assert (float(rows["fp16"]["kl_mean"]), float(rows["fp16"]["top1_agreement"])) == (0.0, 1.0)
    assert (float(rows["bnb_nf4"]["kl_mean"]), float(rows["bnb_nf4"]["kl_p99"])) == (0.0123, 0.094)
    assert rows["gptq"]["status"] == "FAILED" and rows["gptq"]["kl_mean"] == ""  # never a 0 for a failed run
    md = (built / "report.md").read_text()
    assert (
        "## (b2) Next-token quality vs the baseline" in md and "| bnb_nf4 | 0.0123 | — | 0.094 | 95.10% | 7.61 |" in md
    )


def test_decision_matrix_prefers_fast_only_within_noise(built):
    matrix = {r["constraint"].split(" (")[0]: r for r in read_csv(built / "decision_matrix.csv")}
    assert matrix["Production inference"]["recommended"] == "bnb_nf4"  # aqlm is faster but significantly worse
    assert matrix["Fine-tuning"]["recommended"] == "bnb_nf4"
    assert matrix["Tight GPU memory / absolute minimum memory"]["recommended"] == "aqlm_2bit"
    assert matrix["Mature tooling / legacy stack support"]["recommended"] == "none measured"  # gptq FAILED


def test_summary_run_holds_the_report_and_is_never_read_as_a_run(store, built):
    uri, ids, root = store
    st = Store(uri)
    exp_id = st.experiment_id("quantbench-tiny")
    summaries = st.client.search_runs([exp_id], f"tags.`{SUMMARY_TAG}` = 'true'")
    assert [s.info.run_name for s in summaries] == ["report-s1"]
    files = {a.path for a in st.client.list_artifacts(summaries[0].info.run_id, "report")}
    assert {
        "report/report.md",
        "report/pareto.png",
        "report/accuracy.csv",
        "report/memory.csv",
        "report/throughput.csv",
        "report/decision_matrix.csv",
    } <= files
    sel = st.select("quantbench-tiny")
    assert sel.sweep == "s1" and {r.run_id for r in sel.rows if r.run_id} == set(ids.values())
    # Rebuilding reuses the summary run instead of adding another.
    assert report.main(["--tracking-uri", uri, "--out", str(root / "out2")]) == 0
    assert len(st.client.search_runs([exp_id], f"tags.`{SUMMARY_TAG}` = 'true'")) == 1


def test_baseline_outside_the_sweep_is_said(store):
    uri, ids, _ = store
    st = Store(uri)
    sel = st.select("quantbench-tiny", sweep="sx")  # a sweep without fp16: the latest finished fp16 stands in
    assert sel.baseline.run_id == ids["fp16"] and "baseline taken from run" in sel.baseline_note
    assert st.compare(sel)[sel.rows[0].run_id]["t1"].delta == pytest.approx(-10 / N1)
    sel = st.select("quantbench-tiny", sweep="s1", filter_string="tags.method != 'fp16'")
    assert sel.baseline is None and "no fp16 run" in sel.baseline_note
    assert "awq" not in [r.method for r in sel.rows]  # filtered out is not missing


def test_recommend_from_measurements(store, caplog):
    uri, ids, _ = store
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    comps = st.compare(sel)
    rec = recommend.recommend(sel, comps, recommend.Constraints(max_serve_mem_gb=8, fine_tune=True))
    assert rec.choice.row.run_id == ids["bnb_nf4"]
    rec = recommend.recommend(sel, comps, recommend.Constraints(max_serve_mem_gb=5))
    assert rec.choice.row.method == "aqlm_2bit"  # the only one that fits, said to be worse
    assert "significantly worse" in rec.why
    rec = recommend.recommend(sel, comps, recommend.Constraints(min_tokens_per_s=250))
    assert rec.choice.row.method == "fp16"  # aqlm is faster but fp16 is within noise of itself
    assert any("aqlm_2bit" in o and "significantly worse" in o for o in rec.others)
    with caplog.at_level(logging.INFO):
        rc = recommend.main(["--tracking-uri", uri, "--gpu-memory-gb", "6", "--min-accuracy", "0.99"])
    assert rc == 1 and "No measured method meets every constraint" in caplog.text
    assert "mean accuracy" in caplog.text and ids["bnb_nf4"] in caplog.text


def test_random_weight_runs_show_speed_and_size_but_no_accuracy(tmp_path):
    """model=llama-3.1-8b-shape: chance-level accuracy is not a result, so the report and recommend leave it out."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    gpu = {"weights": "random", "hardware": "h100", "model": "llama-3.1-8b-shape", "host.gpu": "NVIDIA H100 80GB HBM3"}
    log_run(
        client,
        exp,
        "fp16",
        tags=gpu,
        samples={"t1": correctness(N1, 100)},
        metrics={"disk_gb": 16.06, "serve_mem_gb": 18.3, "tokens_per_s_1_stream": 153.8},
    )
    log_run(
        client,
        exp,
        "bnb_nf4",
        tags=gpu | {"quant_library": "bitsandbytes"},
        samples={"t1": correctness(N1, 104)},
        metrics={"disk_gb": 5.71, "serve_mem_gb": 8.7, "tokens_per_s_1_stream": 170.3},
    )
    out = tmp_path / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    accuracy = read_csv(out / "accuracy.csv")
    assert {r["verdict"] for r in accuracy} == {"random weights: accuracy not meaningful"}
    assert all(r["acc"] == "" for r in accuracy)
    memory = {r["method"]: r for r in read_csv(out / "memory.csv")}
    assert float(memory["bnb_nf4"]["serve_mem_gb"]) == 8.7
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    rec = recommend.recommend(sel, st.compare(sel), recommend.Constraints(max_serve_mem_gb=10))
    assert rec.choice.row.method == "bnb_nf4"  # fp16 needs 18.3 GB to serve
    assert "accuracy not compared with fp16 (random weights)" in rec.why and "significantly" not in rec.why


def _shape_sweep(root, backends=("vllm", "vllm", "vllm")):
    """Three random-weight runs in 8B shape (figures from benchmarks/results/2026-11-28-h100), no accuracy."""
    uri, client, exp = make_store(root)
    gpu = {"weights": "random", "model": "llama-3.1-8b-shape", "host.gpu": "NVIDIA H100 80GB HBM3"}
    for (method, disk, tps, bound, kernel), backend in zip(
        [
            ("fp16", 16.06, 153.8, 201.7, "UnquantizedLinearMethod: its own apply() x128"),  # the tags vLLM runs got
            ("bnb_nf4", 5.71, 170.3, None, "BitsAndBytesLinearMethod: its own apply() x128"),
            ("gptq", 5.74, 260.2, 647.0, "AutoGPTQLinearMethod: MarlinLinearKernel x128"),
        ],
        backends,
    ):
        tags = gpu | {"bench_backend": backend, "vllm_linear_kernel": kernel}
        metrics = {"disk_gb": disk, "tokens_per_s_1_stream": tps} | (
            {"roofline_tokens_per_s_1_stream": bound} if bound else {}
        )
        log_run(client, exp, method, tags=tags, metrics=metrics, tasks=[])
    return uri


def test_a_sweep_without_accuracy_plots_speed_against_size_beside_the_bound(tmp_path):
    """Random-weight shapes have no accuracy to plot: the plot is tokens/s at one stream against disk size, each run
    beside its bandwidth bound, with the smaller-and-faster frontier; the report says so."""
    uri = _shape_sweep(tmp_path / "mlruns")
    pts = plot.plot_points(Store(uri).select("quantbench-tiny"))
    assert pts.kind == "speed"
    by_method = {r.method: (x, y, b) for r, x, y, b in zip(pts.rows, pts.xs, pts.ys, pts.bounds)}
    assert by_method == {"fp16": (16.06, 153.8, 201.7), "bnb_nf4": (5.71, 170.3, None), "gptq": (5.74, 260.2, 647.0)}
    assert sorted(pts.rows[i].method for i in pts.frontier) == ["bnb_nf4", "gptq"]  # fp16: bigger and slower
    assert sorted(pts.labels) == ["bnb_nf4, BitsAndBytes", "fp16, Unquantized", "gptq, Marlin"]  # method, kernel
    out = tmp_path / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()
    assert "## Speed vs size" in md and "## Accuracy vs size" not in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_one_method_are_labelled_by_the_overrides_that_tell_them_apart(tmp_path):
    """One artifact served with three kernels (as in benchmarks/results/2026-12-05-h100): the overrides all three share name none."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    common = "experiment=seed_shape hardware=h100 calibration.num_samples=32 method=awq"
    for kernels in ("[MacheteLinearKernel]", "[]", "[MacheteLinearKernel,MarlinLinearKernel]"):
        overrides = f"{common} bench.vllm.disabled_kernels={kernels} paths.mlruns=/tmp/qb-mlruns"
        log_run(client, exp, "awq", tags={"overrides": overrides}, tasks=[])
    log_run(client, exp, "fp16", tags={"overrides": "experiment=seed_shape hardware=h100 method=fp16"}, tasks=[])
    labels = sorted(r.label for r in Store(uri).select("quantbench-tiny").rows)
    assert labels == [
        "awq (bench.vllm.disabled_kernels=[MacheteLinearKernel,MarlinLinearKernel])",
        "awq (bench.vllm.disabled_kernels=[MacheteLinearKernel])",
        "awq (bench.vllm.disabled_kernels=[])",
        "fp16",
    ]


def test_speed_measured_with_two_backends_gets_no_frontier(tmp_path):
    """Tokens/s of vLLM and of transformers' generate measure the backends, not the methods: no frontier across them."""
    pts = plot.plot_points(Store(_shape_sweep(tmp_path / "mlruns", ("vllm", "hf", "vllm"))).select("quantbench-tiny"))
    assert pts.kind == "speed" and len(pts.rows) == 3
    assert pts.frontier == [] and pts.note == "no frontier: tokens/s measured with 2 backends or machines"


def test_a_sweep_with_accuracy_plots_accuracy_against_size(built, store):
    pts = plot.plot_points(Store(store[0]).select("quantbench-tiny"))
    assert pts.kind == "accuracy" and pts.rows and all(0 < y <= 100 for y in pts.ys)
    assert "## Accuracy vs size" in (built / "report.md").read_text()


def test_a_summary_run_whose_upload_fails_ends_failed_with_the_reason(store, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _, _ = store

    def refuse(self, run_id, local_path, artifact_path=None):
        raise OSError("artifact store is read-only")

    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    with pytest.raises(OSError):
        report.main(["--tracking-uri", uri, "--out", str(tmp_path / "out"), "--sweep", "s0"])
    st = Store(uri)
    (summary,) = [
        r
        for r in st.client.search_runs([st.experiment_id("quantbench-tiny")], f"tags.`{SUMMARY_TAG}` = 'true'")
        if r.info.run_name == "report-s0"
    ]
    assert summary.info.status == "FAILED"
    assert "read-only" in summary.data.tags["failure_reason"]


def test_kl_divergence_groups_methods_only_where_paired_intervals_separate_them(tmp_path):
    """Per-window KL on one held-out text: gptq and awq differ by alternating noise, rtn sits clearly above both,
    aqlm far above; fp16 is the baseline itself (0 everywhere)."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    gptq = [3e-4 + 1e-4 * ((i % 4) - 1.5) for i in range(16)]
    kl = {
        "fp16": [0.0] * 16,
        "gptq": gptq,
        "awq": [v + (2e-5 if i % 2 else -1.5e-5) for i, v in enumerate(gptq)],
        "rtn": [v + 4e-4 + 5e-5 * (i % 3) for i, v in enumerate(gptq)],
        "aqlm_2bit": [v + 5e-3 for v in gptq],
    }
    for i, (method, values) in enumerate(kl.items()):
        log_run(
            client,
            exp,
            method,
            job_num=i,
            samples={"t1": correctness(N1, 300)},
            metrics={"quality_kl_mean": sum(values) / 16},
            quality_windows={"kl_mean": values},
        )
    out = tmp_path / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()
    assert "## (b3) What the KL divergence separates: fp16 < gptq ≈ awq < rtn < aqlm_2bit" in md
    steps = {r["to"]: r for r in read_csv(out / "quality_groups.csv")}
    assert steps["awq"]["verdict"] == "within noise" and float(steps["awq"]["ci_low"]) < 0 < float(
        steps["awq"]["ci_high"]
    )
    assert steps["rtn"]["verdict"] == "separated" and float(steps["rtn"]["ci_low"]) > 0
    assert int(steps["rtn"]["windows"]) == 16
    quality = {r["method"]: r for r in read_csv(out / "quality.csv")}
    assert float(quality["rtn"]["kl_ci_low"]) < float(quality["rtn"]["kl_mean"]) < float(quality["rtn"]["kl_ci_high"])


def test_a_job_completed_by_a_rerun_of_its_sweep_shows_once_as_finished_and_a_job_still_failing_as_failed(tmp_path):
    """A sweep rerun into the same folder has the same sweep_id: the job's interrupted attempt is superseded by the
    run that finished it (same config_hash); a job that failed and was not rerun still shows as FAILED."""
    uri, client, exp = make_store(tmp_path)
    log_run(client, exp, "fp16", tags={"config_hash": "a"})
    log_run(client, exp, "gptq", tags={"config_hash": "b"}, status="FAILED", failure_reason="interrupted", job_num=1)
    log_run(client, exp, "gptq", tags={"config_hash": "b"}, job_num=1)
    log_run(client, exp, "awq", tags={"config_hash": "c"}, status="FAILED", failure_reason="out of memory", job_num=2)
    rows = Store(uri).select("quantbench-tiny").rows
    assert [(r.method, r.status) for r in rows] == [("fp16", "FINISHED"), ("gptq", "FINISHED"), ("awq", "FAILED")]


def test_per_window_kl_pairs_only_runs_scored_on_the_same_windows(tmp_path):
    """Two runs with as many windows, but cut from the text at another seq_len (their quality_windows_sha256 tags
    differ): resampling them as pairs would compare other texts, so the separation table does not."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    values = [1e-3 + 1e-4 * (i % 3) for i in range(16)]
    for i, (method, windows) in enumerate((("fp16", "aaaa"), ("gptq", "aaaa"), ("awq", "bbbb"))):
        log_run(client, exp, method, job_num=i, samples={"t1": correctness(N1, 300)},
                metrics={"quality_kl_mean": i * 1e-3}, tags={"quality_windows_sha256": windows},
                quality_windows={"kl_mean": [i * v for v in values]})  # fmt: skip
    out = tmp_path / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    steps = {r["to"]: r for r in read_csv(out / "quality_groups.csv")}
    assert steps["gptq"]["verdict"] == "separated"
    assert steps["awq"]["verdict"] == "not comparable: different held-out windows" and steps["awq"]["windows"] == ""


def test_the_accuracy_table_shows_acc_norm_where_a_task_scores_it(tmp_path):
    uri, client, exp = make_store(tmp_path / "mlruns")
    for i, method in enumerate(("fp16", "gptq")):
        log_run(client, exp, method, job_num=i, samples={"arc_challenge": correctness(N1, 200 + 10 * i)},
                metrics={"arc_challenge_acc_norm": 0.6 + i / 100, "arc_challenge_acc_norm_stderr": 0.02})  # fmt: skip
    out = tmp_path / "out"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    rows = {r["method"]: r for r in read_csv(out / "accuracy.csv")}
    assert (rows["gptq"]["task"], float(rows["gptq"]["acc_norm"]), float(rows["gptq"]["acc"])) == (
        "arc_challenge", 0.61, 0.525)  # fmt: skip
    assert "| Normalized acc ± stderr |" in (out / "report.md").read_text()


def test_the_report_shows_a_quantized_lm_head_and_the_kv_cache_dtype_of_each_run(tmp_path):
    """Two knobs that change what a step reads (method.quantize_lm_head, bench.vllm.kv_cache_dtype) are in the tables:
    the LM head's bits with "(quantized)" where the method quantized it, and vLLM's KV cache dtype."""
    from quantbench.study.report import tables

    uri, client, exp = make_store(tmp_path / "mlruns")
    runs = [
        ("fp16", "false", 16.0, "auto"),
        ("fp8", "false", 16.0, "auto"),
        ("fp8", "true", 8.0625, "fp8"),
    ]
    for method, head, head_bits, kv in runs:
        tags = {
            "quantize_lm_head": head,
            "bench_backend": "vllm",
            "vllm_kv_cache_dtype": kv,
            "overrides": f"method={method} method.quantize_lm_head={head} bench.vllm.kv_cache_dtype={kv}",
        }
        metrics = {"lm_head_bits_per_weight": head_bits, "bits_per_weight": 8.05, "tokens_per_s_1_stream": 10.0}
        log_run(client, exp, method, tags=tags, metrics=metrics, tasks=[])
    sel = Store(uri).select("quantbench-tiny")
    memory = tables.memory_table(sel)
    column = memory.headers.index("LM head bits")
    heads = sorted(row[column] for row in memory.cells)
    assert heads == ["16.00", "16.00", "8.06 (quantized)"]
    assert {rec["quantize_lm_head"] for rec in memory.records} == {"true", "false"}
    speed = tables.throughput_table(sel)
    assert sorted(row[speed.headers.index("KV cache")] for row in speed.cells) == ["auto", "auto", "fp8"]
