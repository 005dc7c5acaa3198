"""An lm-eval group and an acc_norm task through the real CLI, then report, recommend and register on the store: the
seed's path for lm-eval's own `mmlu` (a group whose average lm-eval computes) and `arc_challenge` (acc and acc_norm),
with local tasks of the same shapes in place of the hub's. Also what every run now says about its own figures: what
each memory figure measured, the held-out windows its quality was scored on, the threads its benchmark ran on."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from helpers.lm_eval_tasks import seed_like

from conftest import run_cli
from quantbench import recommend, registry, report

pytestmark = pytest.mark.e2e
LIMIT = 20


@pytest.fixture(scope="module")
def sweep(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_groups")
    tasks = seed_like(work / "tasks", tiny_root)
    store = run_cli(
        "-m", "method=fp16,rtn", "eval.tasks=[qb_all,qb_norm]", f"eval.include_path={tasks}", f"eval.limit={LIMIT}",
        "bench.streams=[1]", "bench.repeats=1", "quality.num_tokens=512",
        mlruns=work / "mlruns", workdir=work,
    )  # fmt: skip
    return store, {r.data.tags["method"]: r for r in store.runs()}, work


def test_the_group_and_the_acc_norm_task_are_logged_under_their_real_names(sweep):
    _, runs, _ = sweep
    for run in runs.values():
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert {"qb_all_acc", "qb_all_acc_stderr", "qb_norm_acc", "qb_norm_acc_norm", "qb_norm_acc_norm_stderr"} <= set(
            m
        )
        assert not any(k.startswith(("qb_facts", "qb_knowledge")) for k in m)  # subtasks: in eval/per_task.json


def test_the_subtasks_are_an_artifact_and_the_groups_documents_pair_by_subtask(sweep):
    store, runs, work = sweep
    rid = runs["rtn"].info.run_id
    per_task = json.load(open(store.client.download_artifacts(rid, "eval/per_task.json", str(work))))
    assert per_task["group_subtasks"]["qb_all"] == ["qb_knowledge", "qb_arith"]
    assert per_task["results"]["qb_all"]["acc"] == runs["rtn"].data.metrics["qb_all_acc"]
    samples = json.load(open(store.client.download_artifacts(rid, "eval/samples.json", str(work))))
    assert sorted(samples) == ["qb_all", "qb_norm"]
    assert {r["task"] for r in samples["qb_all"]} == {"qb_facts", "qb_facts2", "qb_arith"}


def test_each_run_says_what_its_figures_measured(sweep):
    _, runs, _ = sweep
    for run in runs.values():
        tags = run.data.tags
        for name in ("quantize_peak_mem_gb", "eval_peak_mem_gb", "bench_peak_mem_gb", "serve_mem_gb", "peak_mem_gb"):
            assert tags[f"mem_basis.{name}"] == "job_process_rss", name  # on a CPU: the job's RSS
        assert int(tags["bench_threads"]) >= 1
    assert len({r.data.tags["quality_windows_sha256"] for r in runs.values()}) == 1  # one text, one cut


def test_report_recommend_and_register_use_the_real_names(sweep, tmp_path, caplog):
    store, runs, _ = sweep
    assert report.main(["--tracking-uri", store.uri, "--out", str(tmp_path), "--no-log"]) == 0
    with (tmp_path / "accuracy.csv").open() as fh:
        rows = {(r["method"], r["task"]): r for r in csv.DictReader(fh)}
    assert {t for _, t in rows} == {"qb_all", "qb_norm"}
    rtn = rows[("rtn", "qb_all")]
    assert (rtn["ci_method"], int(rtn["n_paired"])) == ("paired bootstrap", 3 * LIMIT)  # every document, by subtask
    assert float(rows[("rtn", "qb_norm")]["acc_norm"]) == runs["rtn"].data.metrics["qb_norm_acc_norm"]
    with caplog.at_level(logging.INFO):
        assert recommend.main(["--tracking-uri", store.uri]) == 0
        assert registry.main(["--tracking-uri", store.uri, "--dry-run"]) == 0
    assert "WON " in caplog.text
    with (tmp_path / "decision_matrix.csv").open() as fh:
        production = next(r for r in csv.DictReader(fh) if r["constraint"].startswith("Production"))
    assert production["recommended"] == "rtn"  # the only quantized run: compared with fp16 on qb_all and qb_norm
    assert "no task significantly worse than fp16" in production["evidence"]
