"""Fault suite: jobs that share a machine, a store and a cache, and what goes wrong between runs (library upgrades,
a full disk). Each case ends with nothing lost, nothing mixed up, and every run FINISHED, SKIPPED with the run that
stands for it, or FAILED with a reason. End to end: real `run.py` processes on the embedded model, a real SQLite
MLflow store, real quantizers; `make test` runs them (with every other test under tests/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import CACHE, ROOT, run_cli
from helpers.together import run_together
from quantbench import measure
from quantbench.tracking import logged_model

pytestmark = pytest.mark.e2e

QUICK = ("eval=none", "quality=none", "bench=none")  # quantize, save, verify in a fresh process, log
ENV = {"QUANTBENCH_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
RUN_PY = f"""
import runpy
import quantbench.ops.app, quantbench.job.pipeline  # the imports before the start line: the jobs then start together
sys.argv[0] = {str(ROOT / "run.py")!r}
"""
MAIN = "runpy.run_path(sys.argv[0], run_name='__main__')"
# what each method's config.json calls its format (quantization_config.quant_method), by its quant_format tag
QUANT_METHOD = {"gptq": "gptq", "compressed-tensors": "compressed-tensors"}


def runs_of(mlruns: Path, experiment: str = "quantbench-tiny") -> list:
    client = MlflowClient(f"sqlite:///{mlruns}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def assert_ended_well(runs: list) -> None:
    """Every run FINISHED, or FAILED saying why; none left RUNNING."""
    for run in runs:
        status, tags = run.info.status, run.data.tags
        assert status in ("FINISHED", "FAILED"), f"run {run.info.run_id} is {status}"
        if status == "FAILED":
            assert tags.get("failure_reason"), f"run {run.info.run_id} FAILED without a reason"


def logged_format(client: MlflowClient, run, tmp_path: Path) -> str:
    """quantization_config.quant_method of the run's logged model."""
    model = logged_model.of_run(client, run.info.run_id)
    local = logged_model.download(model, tmp_path / run.info.run_id, client.tracking_uri) / "config.json"
    return json.loads(local.read_text())["quantization_config"]["quant_method"]


def timestamp_of(folder: str) -> str:
    return re.match(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", Path(folder).name).group(0)


def test_two_jobs_started_in_the_same_second_keep_their_own_folders_and_models(tiny_root, tmp_path):
    """Two users, a CI matrix or a script start `run.py method=gptq` and `run.py method=rtn` in the same second:
    each job writes its own folder, and each run's logged model is the checkpoint its method made."""
    mlruns = tmp_path / "mlruns"
    mlruns.mkdir()
    MlflowClient(f"sqlite:///{mlruns}/mlflow.db").search_experiments()  # an existing store (a new one: test_tracking)
    # the run folder as conf/hydra/default.yaml names it, its ${now:...} one second for both jobs: two real starts
    # resolve it in the same second only by luck (the first try missed it about every other time)
    pattern = yaml.safe_load((ROOT / "conf/hydra/default.yaml").read_text())["run"]["dir"]
    run_dir = re.sub(r"\$\{now:[^}]*\}", time.strftime("%Y-%m-%d_%H-%M-%S"), pattern)
    assert run_dir != pattern, pattern
    # as in the issue: force=true, and the cache off so that both jobs quantize and save
    common = [*QUICK, "force=true", "quantized_cache.enabled=false", f"paths.root={tmp_path}", f"paths.mlruns={mlruns}",
              f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = run_together(
        [(RUN_PY, MAIN, [f"method={m}", *common]) for m in ("gptq", "rtn")], env=ENV, cwd=tmp_path, same_second=True
    )
    for result in done:
        assert result.returncode == 0, result.stdout[-4000:]
    runs = runs_of(mlruns)
    folders = [r.data.tags["hydra_output_dir"] for r in runs]
    assert len(runs) == 2 and timestamp_of(folders[0]) == timestamp_of(folders[1]), folders
    assert folders[0] != folders[1]
    assert_ended_well(runs)
    client = MlflowClient(f"sqlite:///{mlruns}/mlflow.db")
    for run in runs:
        assert run.data.tags["quant_format"] == {"gptq": "gptq", "rtn": "compressed-tensors"}[run.data.tags["method"]]
        assert logged_format(client, run, tmp_path) == QUANT_METHOD[run.data.tags["quant_format"]]
        (model,) = Path(run.data.tags["hydra_output_dir"]).glob("model*")
        assert measure.file_sha256(model) == json.loads(
            Path(client.download_artifacts(run.info.run_id, measure.MODEL_SHA256, str(tmp_path))).read_text()
        )


def test_two_sweeps_at_once_on_one_sqlite_store_each_end_clearly(tiny_root, tmp_path):
    """Two `run.py -m` processes (two users of one machine's store) start together on one SQLite file with the same
    jobs: each sweep has its own folder, and every job ends FINISHED, SKIPPED naming the run that stands for it, or
    FAILED with a reason; no run is left RUNNING, none holds another's model."""
    mlruns = tmp_path / "mlruns"
    common = ["-m", "method=fp16,rtn", *QUICK, f"paths.root={tmp_path}", f"paths.mlruns={mlruns}",
              f"quantized_cache.dir={tmp_path}/q"]  # fmt: skip
    done = run_together([(RUN_PY, MAIN, common)] * 2, env=ENV, cwd=tmp_path, same_second=True)
    sweeps = sorted(p.name for p in (tmp_path / "multirun").iterdir())
    assert len(sweeps) == 2, sweeps  # started in the same second, two sweep folders
    runs = runs_of(mlruns)
    assert_ended_well(runs)
    for result in done:
        summary = result.stdout[result.stdout.find("Sweep summary") :]
        assert "Sweep summary" in result.stdout, result.stdout[-4000:]
        for status, detail in re.findall(r"^\s+\d+\s+\S.*?\s(FINISHED|SKIPPED|FAILED)\s+(.*)$", summary, re.M):
            if status in ("FINISHED", "SKIPPED"):
                run_id = re.search(r"run (\w+)", detail).group(1)
                assert any(r.info.run_id == run_id and r.info.status == "FINISHED" for r in runs), detail
            else:
                assert detail.strip(), "a FAILED job without its reason"
        assert (result.returncode == 0) == ("FAILED" not in summary.split("\n", 1)[0]), summary[:2000]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert {r.data.tags["method"] for r in finished} == {"fp16", "rtn"}
    for run in finished:  # each run's model folder is its own, inside its own sweep's folder
        (model,) = Path(run.data.tags["hydra_output_dir"]).glob(f"model-{run.info.run_id}")
        assert run.data.tags["sweep_dir"] in str(model)


def fake_version(folder: Path, dist: str, version: str) -> dict[str, str]:
    """An installed version as `importlib.metadata` reports it (a distribution's metadata first on the path): the
    library's code is unchanged, its reported version is not. Returns the environment that puts it first."""
    meta = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return {"PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_a_library_upgrade_between_runs_reruns_what_it_produced_and_reuses_the_rest(tiny_root, tmp_path):
    """The same job after lm-eval reports another version: not skipped; the quantized model comes from the cache
    (no quantization), the evaluation runs again, quality and the benchmark are taken from the first run, each
    naming it (`<stage>_resumed_from`)."""
    job = ("method=rtn", "eval.limit=10", "quality.num_tokens=256", "bench.streams=[1]", "bench.repeats=1",
           "bench.prompt_tokens=8", "bench.output_tokens=8")  # fmt: skip
    mlruns = tmp_path / "mlruns"
    run_cli(*job, mlruns=mlruns, workdir=tmp_path)
    upgraded = run_cli(*job, mlruns=mlruns, workdir=tmp_path, env=fake_version(tmp_path / "site", "lm_eval", "99.0"))
    first, second = upgraded.runs()
    assert "Skipping" not in upgraded.result.stdout and second.info.status == "FINISHED"
    assert (first.data.tags["cache"], second.data.tags["cache"]) == ("miss", "hit")
    assert "Quantizing" not in upgraded.result.stdout
    assert first.data.tags["version.lm-eval"] != second.data.tags["version.lm-eval"] == "99.0"
    assert "eval_resumed_from" not in second.data.tags and second.data.metrics["eval_s"] != first.data.metrics["eval_s"]
    for stage in ("quality", "bench"):
        assert second.data.tags[f"{stage}_resumed_from"] == first.info.run_id
        assert second.data.tags[f"identity.{stage}"] == first.data.tags[f"identity.{stage}"]
    assert second.data.tags["identity.eval"] != first.data.tags["identity.eval"]
    for name in ("tokens_per_s_1_stream", "quality_kl_mean"):
        assert second.data.metrics[name] == first.data.metrics[name]
    artifacts = {a.path for a in upgraded.client.list_artifacts(second.info.run_id, "bench")}
    assert artifacts == {"bench/benchmark.json"}  # what the report reads is there too


def test_a_full_disk_during_a_cache_store_leaves_no_entry_and_the_run_finishes(tiny_root, tmp_path):
    """The cache sits on a file system too small for the artifact (a 1 MB tmpfs): the store fails mid-copy, nothing
    half-written stays in the cache, the run FINISHES with its own results and says the store failed; the next job
    quantizes again, as it must."""
    cache = tmp_path / "small-disk"
    cache.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        mlruns = tmp_path / "mlruns"
        job = ("method=rtn", *QUICK, f"quantized_cache.dir={cache}")
        full = run_cli(*job, mlruns=mlruns, workdir=tmp_path)
        again = run_cli(*job, "force=true", mlruns=mlruns, workdir=tmp_path)
        runs = again.runs()
        assert_ended_well(runs)
        assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
        for run, result in zip(runs, (full, again)):
            assert run.data.tags["cache"] == "miss" and "Quantizing" in result.result.stdout
            assert (
                run.data.tags["cache_store"].startswith("failed:") and "No space left" in run.data.tags["cache_store"]
            )
            assert "Could not store the quantized model in the cache" in result.result.stdout
            assert "instead of hard-linking" in result.result.stdout  # another file system: copied, and said so
            model = logged_model.of_run(again.client, run.info.run_id)  # the model is logged
            assert again.client.list_logged_model_artifacts(model.model_id)
        assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []
    finally:
        subprocess.run(["umount", str(cache)], check=False)
        shutil.rmtree(cache, ignore_errors=True)
