"""quantbench on the hub path, through the real CLI against the local hub (tests/helpers/hub.py): a model by hub id
runs to FINISHED with the commit the hub resolved; each way the hub can refuse is a one-paragraph error before any
weights load, a non-zero exit and a FAILED run that says why, and leaves the runs already in the store as they were."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from conftest import run_cli
from helpers.hub_repos import SEED_MODELS, TEST_DATASET

pytestmark = pytest.mark.e2e

INSTRUCT, BASE = SEED_MODELS
EXPERIMENT = "hub-path"
NOTHING_ELSE = ("eval=none", "quality=none", "bench=none", f"tracking.experiment={EXPERIMENT}")


def _folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def served_sha(url: str, repo_id: str, kind: str = "models") -> str:
    with urllib.request.urlopen(f"{url}/api/{kind}/{repo_id}/revision/main", timeout=10) as answer:
        return json.load(answer)["sha"]


@pytest.fixture(scope="module")
def hub_store(local_hub, tmp_path_factory):
    """A store with one FINISHED run: the cheapest job that loads the seed's model by hub id from the local hub."""
    work = tmp_path_factory.mktemp("hub_path")
    store = run_cli(
        "method=fp16",
        "model=llama-3.1-8b-instruct",
        *NOTHING_ELSE,
        mlruns=work / "mlruns",
        workdir=work,
        env=local_hub.env(work),
        timeout=1200,
    )
    return work, store


def test_a_model_by_hub_id_finishes_with_the_commit_the_hub_resolved(hub_store, local_hub):
    work, store = hub_store
    (run,) = store.runs(EXPERIMENT)
    sha = served_sha(local_hub.url, INSTRUCT)
    assert run.info.status == "FINISHED", store.result.stdout[-3000:]
    assert run.data.tags["model.hub_id"] == INSTRUCT
    assert run.data.tags["model.hub_commit"] == sha
    assert run.data.tags["model.hub_endpoint"] == local_hub.url
    assert run.data.params["model.pretrained"] == INSTRUCT and run.data.params["model.revision"] == "None"  # as asked
    # transformers downloaded it into the Hugging Face cache, at that commit, as a user's from_pretrained does
    snapshot = work / "hf_home" / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / sha
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "tokenizer.json").is_file()
    assert run.data.metrics["disk_gb"] > 0 and run.data.tags["artifact_verified"] == "true"


def test_a_calibrated_method_reads_a_hub_dataset_and_a_model_at_a_commit(hub_store, local_hub):
    """GPTQ on the model pinned to the hub's sha (GPTQModel takes a folder: the snapshot at that commit), calibrated on
    a hub dataset's config: both commits are logged."""
    work, _ = hub_store
    sha = served_sha(local_hub.url, INSTRUCT)
    store = run_cli(
        "method=gptq",
        "eval=none",
        "quality=none",
        "bench=none",
        f"tracking.experiment={EXPERIMENT}-gptq",
        "model=llama-3.1-8b-instruct",
        f"model.revision={sha}",
        f"calibration.dataset={TEST_DATASET}",
        "calibration.subset=long",
        "calibration.num_samples=4",
        "calibration.seq_len=64",
        mlruns=work / "mlruns",
        workdir=_folder(work / "gptq"),
        env=local_hub.env(work),
        timeout=1800,
    )
    (run,) = store.runs(f"{EXPERIMENT}-gptq")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.revision"] == sha and run.data.tags["model.hub_commit"] == sha
    assert run.data.params["calibration.hub_id"] == TEST_DATASET
    assert run.data.params["calibration.hub_subset"] == "long"
    assert run.data.params["calibration.hub_revision"] == served_sha(local_hub.url, TEST_DATASET, "datasets")
    assert run.data.params["calibration.qualifying_texts"] == "8"


def test_offline_a_cached_hub_model_runs_with_the_commit_of_its_snapshot(hub_store, local_hub):
    """HF_HUB_OFFLINE=1 (what the unreachable-hub message tells users): the snapshot the first job downloaded is used,
    and its commit logged."""
    work, _ = hub_store
    env = local_hub.env(work) | {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing to reach
    store = run_cli(
        "method=fp16",
        "model=llama-3.1-8b-instruct",
        *NOTHING_ELSE,
        "force=true",  # the first job's config: run it again rather than skip it
        mlruns=work / "mlruns",
        workdir=_folder(work / "offline"),
        env=env,
        timeout=1200,
    )
    run = store.runs(EXPERIMENT)[-1]
    assert run.info.status == "FINISHED"
    assert run.data.tags["model.hub_commit"] == served_sha(local_hub.url, INSTRUCT)
    assert "using the cached snapshot" in store.result.stdout


def _snapshot(store) -> dict:
    """Everything of every run in the store that a later job must not change."""
    out = {}
    for exp in store.client.search_experiments():
        for run in store.client.search_runs([exp.experiment_id]):
            out[run.info.run_id] = (
                run.info.status,
                run.info.end_time,
                run.data.tags,
                run.data.params,
                run.data.metrics,
            )
    return out


# case -> (overrides, how the environment differs from a logged-in user's, what the message must say)
FAILURES = {
    "gated without a token": (
        ("method=fp16", "model=llama-3.1-8b"),
        "no token",
        [f"model.pretrained='{BASE}'", "is gated", "`hf auth login`", "`huggingface-cli login`", "HF_TOKEN"],
    ),
    "unknown repo": (
        ("method=fp16", "model=llama-3.1-8b-instruct", "model.pretrained=meta-llama/No-Such-Model"),
        "",
        ["there is no model 'meta-llama/No-Such-Model' on the hub"],
    ),
    "unknown revision": (
        ("method=fp16", "model=llama-3.1-8b-instruct", "model.revision=no-such-branch"),
        "",
        [f"the model '{INSTRUCT}' has no revision 'no-such-branch'"],
    ),
    "refused token": (
        ("method=fp16", "model=llama-3.1-8b-instruct"),
        "invalid token",
        ["the hub refused the credential", "HTTP 401", "HF_TOKEN"],
    ),
    "dataset subset missing": (
        (
            "method=gptq",
            "model=llama-3.1-8b-instruct",
            f"calibration.dataset={TEST_DATASET}",
            "calibration.subset=nope",
        ),
        "",
        [f"calibration.dataset='{TEST_DATASET}' has no subset 'nope'", "its subsets are ['short', 'long']"],
    ),
    "hub unreachable": (
        ("method=fp16", "model=llama-3.1-8b-instruct"),
        "stopped hub",
        ["the hub cannot be reached", "Connection refused", "HF_HUB_OFFLINE=1", "local folder", "HF_ENDPOINT"],
    ),
}


@pytest.mark.parametrize("case", FAILURES)
def test_each_hub_refusal_is_one_paragraph_before_any_weights_and_a_failed_run(
    case, hub_store, local_hub, stopped_hub, tmp_path
):
    work, first = hub_store
    overrides, difference, needles = FAILURES[case]
    hub = stopped_hub if difference == "stopped hub" else local_hub
    env = hub.env(tmp_path, token=difference != "no token")  # an empty Hugging Face cache
    if difference == "invalid token":
        env["HF_TOKEN"] = "hf_a_token_this_hub_never_issued"
    if difference == "stopped hub":
        needles = [*needles, hub.url]
    before = _snapshot(first)
    started = time.monotonic()
    store = run_cli(
        *overrides,
        *NOTHING_ELSE,
        "force=true",  # some of these are the FINISHED run's config, which a rerun skips without asking the hub
        mlruns=work / "mlruns",
        workdir=tmp_path,
        env=env,
        check=False,
        timeout=600,
    )
    wall = time.monotonic() - started
    out = store.result.stdout
    assert store.result.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]  # a paragraph, not a crash
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    after = _snapshot(store)
    new = set(after) - set(before)
    assert {k: after[k] for k in before} == before  # the runs already there are untouched
    (run_id,) = new
    status, end, tags, params, metrics = after[run_id]
    assert status == "FAILED" and tags["failure_type"] == "ConfigError"
    for needle in needles:
        assert needle in tags["failure_reason"], (needle, tags["failure_reason"])
    assert "\n" not in tags["failure_reason"]  # one paragraph
    assert "disk_gb" not in metrics and "quantize_s" not in metrics  # no weights were loaded
    assert "model.hub_commit" not in tags
    run = store.client.get_run(run_id)
    seconds = (run.info.end_time - run.info.start_time) / 1000
    print(f"{case}: the job failed {seconds:.1f} s after its run started ({wall:.1f} s for the whole CLI)")
    if case == "hub unreachable":
        assert seconds < 15, f"an unreachable hub took {seconds:.1f} s to fail"
