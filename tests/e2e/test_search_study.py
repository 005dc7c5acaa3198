"""An Optuna search end to end on the embedded model (`python run.py -m search=mixed_precision`, conf/search/): RTN
group size x mixed precision for KL and disk size, through real Hydra, llm-compressor, MLflow and Optuna. Each trial
is one MLflow run; a mixed-precision trial's bits_per_weight and size are its logged layout's; the front is compared
with the default sweep's runs; a search killed with kill -9 continues where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
from mlflow.tracking import MlflowClient
import pytest
from conftest import CACHE, ROOT, run_cli
from helpers.ray_local import local_ray, most_at_once

from quantbench import measure
from quantbench.stores import study_storage
from quantbench.study import search
from quantbench.study.runs import Store

pytestmark = pytest.mark.e2e

STUDY = "mixed_precision-tiny"
N_TRIALS = 6
FORMAT_BITS = {"unquantized": 16.0}  # int<b>-g<g>: b bits and one bf16 scale per g weights (symmetric: no zero)


def format_bits(fmt: str) -> float:
    if fmt in FORMAT_BITS:
        return FORMAT_BITS[fmt]
    bits, group = fmt.removeprefix("int").split("-g")
    return int(bits) + 16 / int(group)


@pytest.fixture(scope="module")
def searched(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    started = time.monotonic()
    store = run_cli("-m", "search=mixed_precision", f"hydra.sweeper.n_trials={N_TRIALS}", mlruns=work / "mlruns",
                    workdir=work)  # fmt: skip
    print(f"search of {N_TRIALS} trials: {time.monotonic() - started:.0f} s")
    study = search.load(f"sqlite:///{work / 'mlruns' / 'optuna.db'}", STUDY)
    return store, study


def test_every_trial_is_one_tagged_run_and_a_repeated_config_reuses_its_run(searched):
    store, study = searched
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * N_TRIALS
    runs = {r.info.run_id: r for r in store.runs()}
    own = {int(r.data.tags["search_trial"]): r for r in runs.values() if r.data.tags.get("search_study") == STUDY}
    for t in trials:
        run = runs[t.user_attrs["run_id"]]
        assert run.info.status == "FINISHED"
        if t.user_attrs["run_status"] == "FINISHED":  # ran now: the run is the trial's own
            assert own[t.number].info.run_id == run.info.run_id
            assert run.data.tags["search_sampler"] == "TPESampler"
            assert run.data.params["method.group_size"] == str(t.params["method.group_size"])
        else:  # SKIPPED: an earlier trial's FINISHED run of the same config stands for it
            assert run.data.tags[f"search_trial.{STUDY}"] == str(t.number)
        assert t.values == [run.data.metrics["quality_kl_mean"], run.data.metrics["disk_gb"]]
    assert len(own) == len(runs)  # no run outside the study's trials, none twice
    assert Store(store.uri).select("quantbench-tiny", f"study:{STUDY}").finished  # register/recommend's selection


def test_a_mixed_precision_trial_logs_its_layout_and_measures_it(searched, tiny_root):
    from transformers import AutoConfig

    store, _ = searched
    mixed = [r for r in store.runs() if r.data.tags.get("layout")]
    assert mixed, "no trial kept layers at another precision"
    shapes = measure.linear_shapes_of_config(AutoConfig.from_pretrained(tiny_root / "model"))
    source = measure.safetensors_index(tiny_root / "model")
    rest = sum(b for name, (_, _, b) in source.items() if not any(name.startswith(p + ".") for p in shapes))
    for run in mixed:
        folder = store.client.download_artifacts(run.info.run_id, "layout.json")
        layout = json.loads(open(folder).read())
        assert set(layout) == set(shapes)
        stored_bits = {name: format_bits(fmt) * o * i for name, (o, i) in shapes.items() for fmt in [layout[name]]}
        expected_bpw = sum(stored_bits.values()) / sum(o * i for o, i in shapes.values())
        assert run.data.metrics["bits_per_weight"] == pytest.approx(expected_bpw, rel=2e-3), run.data.tags["layout"]
        expected_gb = (sum(stored_bits.values()) / 8 + rest) / measure.GB
        assert run.data.metrics["weight_gb"] == pytest.approx(expected_gb, rel=2e-3)
        assert 0 < run.data.metrics["disk_gb"] - run.data.metrics["weight_gb"] < 0.002  # configs and tokenizer


def test_the_front_against_the_default_sweep(searched, default_sweep, capsys):
    """The issue asks for a point strictly better on both objectives than a grid run, or an honest 'none found'."""
    _, study = searched
    rows = search.trials(study)
    grid = Store(default_sweep.uri).select("quantbench-tiny").finished
    beats = search.beaten([r for r in rows if r.on_front], grid, {"quality_kl_mean": "minimize", "disk_gb": "minimize"})
    text = search.page(study, rows, search.importances(study), beats, "the default sweep")
    with capsys.disabled():
        print("\n" + text)
    assert ("beats" in text) == bool(beats) and ("none found" in text) == (not beats)
    assert any(r.on_front for r in rows) and all(search.importances(study).values())


def test_a_search_killed_with_kill_9_continues_without_repeating_finished_trials(tiny_root, tmp_path):
    """kill -9 of the sweeper while a trial runs; the same command again finishes the study: the trials that had
    finished stay as they were, the killed one is failed (its heartbeat went stale) and retried, and its job's run
    is FAILED ('interrupted') in MLflow."""
    args = ["-m", "search=mixed_precision", "hydra.sweeper.study_name=resume", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.heartbeat_interval_s=1", "hydra.sweeper.grace_period_s=2"]  # fmt: skip
    mlruns = tmp_path / "mlruns"
    storage = f"sqlite:///{mlruns / 'optuna.db'}"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"paths.mlruns={mlruns}",
           f"hydra.sweep.dir={tmp_path}/multirun", f"quantized_cache.dir={tmp_path}/quantized", *args[1:]]  # fmt: skip
    env = {**os.environ, "QUANTBENCH_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)  # fmt: skip
    try:
        before = wait_for(storage, "resume", lambda ts: sum(t.state.name == "COMPLETE" for t in ts) >= 1
                          and any(t.state.name == "RUNNING" for t in ts), proc)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done_before = {t.number: (t.values, t.user_attrs["run_id"]) for t in before if t.state.name == "COMPLETE"}
    killed = next(t.number for t in before if t.state.name == "RUNNING")
    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    store = run_cli(*args, mlruns=mlruns, workdir=tmp_path)
    after = {t.number: t for t in optuna.load_study(study_name="resume", storage=storage).get_trials()}
    assert {n: (after[n].values, after[n].user_attrs["run_id"]) for n in done_before} == done_before
    assert after[killed].state.name == "FAIL"
    retry = next(t for t in after.values() if t.system_attrs.get("failed_trial") == killed)
    assert retry.state.name == "COMPLETE" and retry.params == after[killed].params
    counted = [t for t in after.values() if t.number != killed]
    assert [t.state.name for t in counted] == ["COMPLETE"] * 2
    statuses = sorted(r.info.status for r in store.runs())
    finished = [r for r in store.runs() if r.info.status == "FINISHED"]
    assert len({r.data.tags["config_hash"] for r in finished}) == len(finished)  # nothing ran twice
    assert statuses.count("FINISHED") == len({t.user_attrs["run_id"] for t in counted}), statuses
    failed = [r for r in store.runs() if r.info.status == "FAILED"]
    assert all(r.data.tags["search_trial"] == str(killed) for r in failed), [r.data.tags for r in failed]


def wait_for(storage: str, name: str, done, proc, timeout_s: float = 600):
    """The study's trials once `done(trials)` holds (polling its database), before `proc` ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before it could be killed"
        if not os.path.exists(storage.removeprefix("sqlite:///")):
            time.sleep(0.5)
            continue
        try:  # opening the storage writes its schema if the sweeper has not yet: study_storage retries that race
            trials = optuna.load_study(study_name=name, storage=study_storage(storage)).get_trials()
            if done(trials):
                return trials
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"no such state of study {name} within {timeout_s} s")


def test_two_sweepers_share_one_study_and_every_trial_reaches_the_server_once(postgres_server, tiny_root, tmp_path):
    """Two sweeper processes at once on one study (its database shared), both logging to the tracking server: each
    asks the study for its next trial, and every trial is one run on the server, none run twice."""
    url, _ = postgres_server
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["-m", "search=mixed_precision", "tracking=server", "tracking.experiment=search-parallel",
            "hydra.sweeper.study_name=parallel", "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.heartbeat_interval_s=2", f"paths.mlruns={tmp_path}/unused"]  # fmt: skip
    env = {**os.environ, "QUANTBENCH_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": url}  # fmt: skip
    procs = []
    for seed, worker in enumerate("ab"):  # a seed each: seeded alike, two samplers propose the same trials
        (tmp_path / worker).mkdir()
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"hydra.sweep.dir={tmp_path}/{worker}/multirun",
               f"quantized_cache.dir={tmp_path}/quantized", f"hydra.sweeper.sampler.seed={seed}", *args[1:]]  # fmt: skip
        out = open(tmp_path / worker / "log", "w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path / worker))
    for proc, worker in zip(procs, "ab"):
        assert proc.wait(timeout=1200) == 0, (tmp_path / worker / "log").read_text()[-4000:]
    trials = optuna.load_study(study_name="parallel", storage=storage).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # each worker stops once the study holds n_trials; two that ask at the same moment may add one more
    assert 4 <= len(complete) <= 5 and len(complete) == len(trials)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("search-parallel").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["sweep_dir"] for r in runs}) == 2  # both workers ran trials
    own = [r for r in runs if r.data.tags.get("search_study") == "parallel"]
    assert len({r.data.tags["search_trial"] for r in own}) == len(own) == len(runs)  # one run per trial it ran
    assert {t.user_attrs["run_id"] for t in complete} == {r.info.run_id for r in runs}  # reused runs included


def test_a_ray_launched_search_runs_two_trials_at_once_and_every_trial_reaches_the_server_once(
    postgres_server, tiny_root, tmp_path, monkeypatch
):
    """One sweeper hands two trials at a time (hydra.sweeper.n_jobs=2) to the Ray launcher on a local head of two
    CPUs: two Ray workers run trials of one study in parallel, each trial is one run on the tracking server, and the
    study and the server agree on which run each trial is."""
    url, _ = postgres_server
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with local_ray(monkeypatch) as ray:
        run_cli("-m", "search=mixed_precision", *ray, "tracking=server", "tracking.experiment=search-ray",
                "hydra.sweeper.study_name=ray", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                f"hydra.sweeper.storage={storage}", mlruns=tmp_path / "unused", workdir=tmp_path)  # fmt: skip
    trials = optuna.load_study(study_name="ray", storage=storage).get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("search-ray").experiment_id])
    assert all(r.info.status == "FINISHED" and r.data.tags["launcher"] == "ray" for r in runs)
    assert len({r.data.tags["search_trial"] for r in runs}) == len(runs)  # no trial ran twice
    assert {t.user_attrs["run_id"] for t in trials} == {r.info.run_id for r in runs}  # reused runs included
    assert len({r.data.tags["ray.worker_id"] for r in runs}) == len(runs)  # max_calls=1: a fresh worker per trial
    assert most_at_once(runs) == 2
    assert not (tmp_path / "unused").exists()  # nothing went to a local store
