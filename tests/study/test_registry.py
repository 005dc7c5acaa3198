"""`make register` on a real SQLite MLflow store: policy reasons, idempotent registration, the alias moving,
and models:/<name>@champion loading back into transformers."""

from __future__ import annotations

import json
import logging
import re

import pytest
from mlflow.exceptions import MlflowException

from helpers.synthetic_store import correctness, log_run, make_store, tiny_model

from quantbench.study import policy, registry
from quantbench.tracking import logged_model
from quantbench.errors import ConfigError
from quantbench.study.runs import Store

N = 400


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """fp16 (fast, big), bnb_nf4 (within noise, small, slower), aqlm_2bit (tiny, 15 pp worse), one FAILED."""
    root = tmp_path_factory.mktemp("registry_store")
    uri, client, exp = make_store(root / "mlruns")
    ids = {
        "fp16": log_run(
            client,
            exp,
            "fp16",
            job_num=0,
            samples={"t1": correctness(N, 360)},
            metrics={"disk_gb": 0.007, "tokens_per_s_1_stream": 200.0, "quality_kl_mean": 0.0},
            model_dir=tiny_model(root / "m_fp16", seed=0),
        ),
        "bnb_nf4": log_run(
            client,
            exp,
            "bnb_nf4",
            job_num=1,
            samples={"t1": correctness(N, 360, 3, 2)},
            metrics={"disk_gb": 0.002, "tokens_per_s_1_stream": 140.0, "quality_kl_mean": 0.01},
            model_dir=tiny_model(root / "m_nf4", seed=1),
        ),
        "aqlm_2bit": log_run(
            client,
            exp,
            "aqlm_2bit",
            job_num=2,
            samples={"t1": correctness(N, 360, 60)},
            metrics={"disk_gb": 0.001, "tokens_per_s_1_stream": 300.0, "quality_kl_mean": 0.2},
        ),
        "gptq": log_run(client, exp, "gptq", job_num=3, status="FAILED", failure_reason="packing failed", tasks=["t1"]),
    }
    return uri, ids


def decisions(uri, *overrides):
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    return (
        st,
        sel,
        {d.row.method: d for d in policy.decide(sel, st.compare(sel), policy.load_policy(overrides=list(overrides)))},
    )


def test_default_policy_reasons(store):
    uri, _ = store
    _, _, ds = decisions(uri)
    assert ds["fp16"].won and "tokens_per_s_1_stream" in ds["fp16"].why
    assert not ds["bnb_nf4"].won and "lost the tie-break on tokens_per_s_1_stream: 140 vs 200" in ds["bnb_nf4"].why
    assert ds["aqlm_2bit"].rejected == ["t1 drops 15.00 pp vs fp16 > max 2"]
    assert ds["gptq"].why == "rejected: FAILED: packing failed"


def test_policy_overrides_and_rejections(store):
    uri, _ = store
    _, _, ds = decisions(uri, "max_disk_gb=0.005", "min_tokens_per_s_1_stream=100")
    assert ds["bnb_nf4"].won
    assert ds["fp16"].rejected == ["disk_gb 0.007 > max 0.005"]
    _, _, ds = decisions(uri, "max_acc_drop_points=null", "rank_by=tokens_per_s_1_stream", "tie_tolerance=0")
    assert ds["aqlm_2bit"].won  # without the accuracy guard the fastest wins
    _, _, ds = decisions(uri, "max_acc_drop_points=null", "reject_significantly_worse=true", "tie_break=disk_gb")
    assert "significantly worse than the baseline on t1" in ds["aqlm_2bit"].rejected[0]
    assert ds["bnb_nf4"].won  # tied with fp16 on accuracy, smaller
    _, _, ds = decisions(uri, "max_acc_drop_points=null", "max_kl_mean=0.05")
    assert ds["aqlm_2bit"].rejected == ["quality_kl_mean 0.2 > max 0.05"]
    _, _, ds = decisions(uri, "max_acc_drop_points=null", "rank_by=quality_kl_mean", "tie_tolerance=0")
    assert ds["fp16"].won  # the least divergence from the baseline is the baseline's own
    with pytest.raises(
        ConfigError, match="max_dsk_gb.*Its keys: registered_name, alias"
    ):  # a typo must not drop a rule
        policy.load_policy(overrides=["max_dsk_gb=1"])
    with pytest.raises(ConfigError, match="max_disk_gb=abc"):
        policy.load_policy(overrides=["max_disk_gb=abc"])
    with pytest.raises(ConfigError, match="its files: default"):
        policy.load_policy(overrides=["policy=nonexistent"])
    assert policy.load_policy(["policy=default", "policy.max_disk_gb=6"]).max_disk_gb == 6.0


def test_register_is_idempotent_and_moves_the_alias(store, caplog):
    uri, ids = store
    st = Store(uri)
    with caplog.at_level(logging.INFO):
        assert registry.main(["--tracking-uri", uri]) == 0
    assert "WON  fp16" in caplog.text and "LOST aqlm_2bit" in caplog.text
    versions = st.client.search_model_versions("name = 'quantbench-tiny'")
    assert len(versions) == 1 and versions[0].run_id == ids["fp16"]
    model = logged_model.of_run(st.client, ids["fp16"])  # the version is the run's logged model, files and all
    assert versions[0].source == f"models:/{model.model_id}"
    # and the logged model lists its versions, as mlflow.register_model leaves it (the Models tab's link)
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "quantbench-tiny", "version": "1"}]
    assert registry.main(["--tracking-uri", uri]) == 0  # same winner: no new version
    assert len(st.client.search_model_versions("name = 'quantbench-tiny'")) == 1

    assert registry.main(["--tracking-uri", uri, "max_disk_gb=0.005"]) == 0
    champion = st.client.get_model_version_by_alias("quantbench-tiny", "champion")
    assert champion.run_id == ids["bnb_nf4"] and str(champion.version) == "2"
    assert champion.tags["policy.max_disk_gb"] == "0.005" and champion.tags["metric.disk_gb"] == "0.002"
    assert "mean accuracy" in champion.tags["why"]

    assert registry.main(["--tracking-uri", uri]) == 0  # back to fp16: the alias moves back, no version 3
    assert str(st.client.get_model_version_by_alias("quantbench-tiny", "champion").version) == "1"
    assert len(st.client.search_model_versions("name = 'quantbench-tiny'")) == 2


def test_nothing_registered_when_policy_rejects_all(store, caplog):
    uri, _ = store
    with caplog.at_level(logging.INFO):
        assert (
            registry.main(
                ["--tracking-uri", uri, "--dry-run", "min_tokens_per_s_1_stream=1000", "registered_name=never"]
            )
            == 1
        )
    assert "No run satisfies the policy" in caplog.text
    assert not Store(uri).client.search_registered_models("name = 'never'")


def test_champion_loads_and_generates(store, tmp_path):
    uri, _ = store
    assert registry.main(["--tracking-uri", uri, "registered_name=loadable"]) == 0
    folder = registry.load_champion(Store(uri), "loadable", dst=tmp_path / "champion")
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    text = registry.smoke_generate(folder, new_tokens=4)
    assert text.startswith("Where does") and len(text.split()) > 2


def test_a_model_folder_changed_after_its_run_is_not_registered(tmp_path, capsys):
    uri, client, exp = make_store(tmp_path / "mlruns")
    run_id = log_run(
        client,
        exp,
        "fp16",
        samples={"t1": correctness(N, 360)},
        metrics={"disk_gb": 0.007},
        model_dir=tiny_model(tmp_path / "m", seed=0),
    )
    logged = logged_model.of_run(client, run_id).artifact_location.removeprefix("file://")
    with open(f"{logged}/config.json", "a") as f:
        f.write(" ")  # one byte more than the job measured
    assert registry.main(["--tracking-uri", uri, "registered_name=edited"]) == 1
    assert re.search(r"config\.json \(changed\).*Nothing registered", capsys.readouterr().err)
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    with pytest.raises(ConfigError, match=r"config\.json \(changed\)"):  # the library raises; main says it and exits 1
        registry.verify_files(st, sel.rows[0])
    with pytest.raises(MlflowException, match="edited"):
        Store(uri).client.get_registered_model("edited")


def test_a_model_logged_by_reference_is_registered_where_it_is_once_its_files_check_out(tmp_path, capsys):
    """tracking.log_model=reference: no copy in the run; the version's source is the folder itself, checked against
    the sha256s the job logged; a folder that moved or changed is refused."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    folder = tiny_model(tmp_path / "shared" / "m", seed=0)
    metrics = {"disk_gb": 0.007}
    run_id = log_run(client, exp, "fp16", samples={"t1": correctness(N, 360)}, metrics=metrics, model_dir=folder,
                     model_by_reference=True)  # fmt: skip
    assert not client.list_artifacts(run_id, "model")
    registry.main(["--tracking-uri", uri, "registered_name=by-reference"])
    version = client.get_model_version_by_alias("by-reference", "champion")
    assert version.run_id == run_id and version.source == folder.resolve().as_uri()
    model = logged_model.of_run(client, run_id)  # linked to the logged model, which carries location and sha256s
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "by-reference", "version": "1"}]

    with open(folder / "config.json", "a") as f:
        f.write(" ")
    assert registry.main(["--tracking-uri", uri, "registered_name=by-reference-edited"]) == 1
    assert "config.json (changed)" in capsys.readouterr().err
    (folder / "config.json").rename(folder / "moved.json")
    folder.rename(folder.with_name("gone"))
    assert registry.main(["--tracking-uri", uri, "registered_name=by-reference-moved"]) == 1
    assert "not a folder on this machine" in capsys.readouterr().err


def test_a_run_logged_before_logged_models_is_registered_from_its_model_folder(tmp_path):
    """A store of older sweeps: the winner's model is a plain `model/` artifact folder, no logged model; it is still
    checked and registered there, and loads back."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    run_id = log_run(client, exp, "fp16", samples={"t1": correctness(N, 360)}, metrics={"disk_gb": 0.007},
                     model_dir=tiny_model(tmp_path / "m", seed=0), legacy_model_folder=True)  # fmt: skip
    assert logged_model.of_run(client, run_id) is None
    assert registry.main(["--tracking-uri", uri, "registered_name=legacy"]) == 0
    version = client.get_model_version_by_alias("legacy", "champion")
    assert version.source.endswith(f"{run_id}/artifacts/model")
    assert (registry.load_champion(Store(uri), "legacy", dst=tmp_path / "champion") / "config.json").exists()


def test_the_policy_refuses_to_rank_tokens_per_s_across_backends_unless_told(tmp_path):
    """gptq served by vLLM, aqlm by transformers' generate: tied on accuracy, so the default tie-break (tokens/s at one
    stream) would compare the backends, not the models."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    gpu = {"host.gpu": "NVIDIA H100 80GB HBM3"}
    runs = (  # method, correctness, backend, tokens/s at one stream
        ("fp16", correctness(N, 300), "vllm", 150.0),
        ("gptq", correctness(N, 300, 1, 1), "vllm", 260.0),
        ("aqlm_2bit", correctness(N, 300, 1, 1), "hf", 30.0),
        # within the accuracy limit but outside the tie: it lost on accuracy, refusal or not, and says so
        ("rtn", correctness(N, 296), "vllm", 400.0),
    )
    for job_num, (method, correct, backend, speed) in enumerate(runs):
        log_run(client, exp, method, job_num=job_num, samples={"t1": correct},
                tags=gpu | {"bench_backend": backend}, metrics={"tokens_per_s_1_stream": speed})  # fmt: skip
    _, _, ds = decisions(uri)
    assert not any(d.won for d in ds.values())
    assert ds["rtn"].why.startswith("mean accuracy 74 is more than 0.5 below the best (75)"), ds["rtn"].why
    assert "tokens_per_s_1_stream cannot rank these runs: tokens_per_s_1_stream was measured on different bases" in (
        ds["gptq"].why
    )
    assert "set rank_across_backends=true" in ds["aqlm_2bit"].why
    _, _, ds = decisions(uri, "rank_across_backends=true")
    assert ds["gptq"].won
    _, _, ds = decisions(uri, "tie_break=disk_gb", "rank_by=mean accuracy", "tie_tolerance=0")  # no speed compared
    assert not any("backends" in d.why for d in ds.values())
