"""Bad input: a clear error naming the bad value before any model is loaded, a non-zero exit, and a FAILED
MLflow run that says why, with no traceback on the console; the other jobs of a sweep still run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_cli
from helpers.hub import unused_endpoint
from helpers.run_if import run_if
from quantbench import bench, models, pipeline
from quantbench.errors import ConfigError


def cfg_with(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override,needle",
    [
        ("bench.streams=[0,8]", "bench.streams=[0, 8]"),
        ("bench.prompt_tokens=-5", "bench.prompt_tokens=-5"),
        ("bench.output_tokens=0", "bench.output_tokens=0"),
        ("bench.backend=tensorrt", "'tensorrt'"),
    ],
)
def test_nonsensical_bench_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        bench.plan(cfg_with(override).bench)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("+bench.nonexistent=1", "Key 'nonexistent' not in 'BenchConfig'"),
        ("+bench.vllm.kv_cache=2", "Key 'kv_cache' not in 'VllmKnobs'"),
        ("+tracking.log_models=false", "Key 'log_models' not in 'TrackingConfig'"),
        ("+method.nonexistent=1", "unexpected keyword argument 'nonexistent'"),
    ],
)
def test_a_key_added_with_plus_is_refused_before_any_model_is_loaded(override, needle):
    """Hydra 1.3 lets `+group.key=value` add a key to a typed group; the job refuses it instead of ignoring it."""
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg_with(override))
    assert needle in str(err.value)


def test_a_kernel_family_that_cannot_serve_the_artifact_is_refused_before_any_model_is_loaded():
    """vLLM would refuse to start only after quantization: Exllama takes float16 activations (the CPU preset is
    bf16) and symmetric weights (AWQ stores zero points unless told not to)."""
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg_with("bench=seed", "bench.vllm.linear_backend=exllama"))
    assert "add bench.vllm.dtype=float16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(
            cfg_with("method=awq", "bench=seed", "bench.vllm.linear_backend=exllama", "bench.vllm.dtype=float16")
        )
    assert "stores a zero point per group" in str(err.value)


def test_missing_model_folder_is_named():
    cfg = cfg_with("model.pretrained=/no/such/model")
    with pytest.raises(ConfigError) as err:
        models.resolve(cfg.model, "/tmp")
    assert "/no/such/model" in str(err.value) and "no such folder" in str(err.value)


def test_hub_id_while_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_with("model=llama-3.1-8b-instruct")
    with pytest.raises(ConfigError) as err:
        models.resolve(cfg.model, "/tmp")
    assert "meta-llama/Llama-3.1-8B-Instruct" in str(err.value) and "offline" in str(err.value)


def test_unknown_eval_task_names_the_known_ones(tiny_root):
    cfg = cfg_with("eval.tasks=[tiny_facts,no_such_task]")
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg)
    assert "no_such_task" in str(err.value) and "tiny_arith" in str(err.value)


@run_if(cuda=False)
def test_gpu_hardware_without_a_gpu_is_refused(tiny_root):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pipeline.prepare(cfg_with("hardware=h100"))


def test_unknown_method_lists_the_valid_choices(tmp_path):
    store = run_cli("method=awqq", mlruns=tmp_path / "mlruns", workdir=tmp_path, check=False, timeout=300)
    assert store.result.returncode != 0
    assert "awqq" in store.result.stdout and "fp16" in store.result.stdout and "bnb_nf4" in store.result.stdout


@pytest.mark.e2e
def test_a_bad_job_fails_its_run_and_the_rest_of_the_sweep_still_runs(tmp_path, tiny_root):
    store = run_cli(
        "-m",
        "model.pretrained=/no/such/model,embedded:tiny",
        "method=fp16",
        "eval=none",
        "bench=none",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
        check=False,
    )
    assert store.result.returncode != 0
    assert "/no/such/model" in store.result.stdout
    assert f"MLflow run {store.runs()[0].info.run_id} ended FAILED" in store.result.stdout
    assert "Traceback" not in store.result.stdout  # bad input is a paragraph, not a crash
    failed, finished = store.runs()
    assert failed.info.status == "FAILED" and finished.info.status == "FINISHED"
    assert "/no/such/model" in failed.data.tags["failure_reason"]
    assert "disk_gb" not in failed.data.metrics  # failed before any model was loaded
    assert failed.data.params["model.pretrained"] == "/no/such/model"  # what was logged is kept
    trace = store.client.download_artifacts(failed.info.run_id, "failure/traceback.txt", str(tmp_path))
    assert "ConfigError" in open(trace).read()  # the whole traceback beside the one-paragraph reason
    assert finished.data.metrics["disk_gb"] > 0


ASK_THE_HUB = """
    import json
    from quantbench import models
    print(json.dumps({{k: models.hub_access_problem(*args) for k, args in {cases!r}.items()}}))
"""


def test_hub_problems_are_told_apart_because_each_has_another_fix(local_hub, tmp_path):
    """The local hub's answers (tests/helpers/hub.py answers as the real hub does), each turned into the reason a user
    can act on. Both meta-llama repositories are gated, as on the real hub."""
    model = "meta-llama/Llama-3.1-8B-Instruct"
    anonymous = local_hub.run_python(
        ASK_THE_HUB.format(cases={"missing": ("meta-llama/No-Such-Model",), "gated": (model,)}), tmp_path, token=False
    )
    assert anonymous["missing"].startswith("there is no model 'meta-llama/No-Such-Model' on the hub")
    assert anonymous["gated"].startswith(f"the model '{model}' is gated: accept its licence")
    assert "`hf auth login`, formerly `huggingface-cli login`; or set HF_TOKEN" in anonymous["gated"]
    logged_in = local_hub.run_python(ASK_THE_HUB.format(cases={"revision": (model, "v9"), "fine": (model,)}), tmp_path)
    assert logged_in["revision"].startswith(f"the model '{model}' has no revision 'v9'")
    assert logged_in["fine"] is None  # HF_TOKEN, as the server knows it, opens the gated repository
    refused = local_hub.run_python(ASK_THE_HUB.format(cases={"m": (model,)}), tmp_path, env={"HF_TOKEN": "hf_other"})
    assert refused["m"].startswith(f"the hub refused the credential for '{model}' (HTTP 401)")
    down = local_hub.run_python(
        ASK_THE_HUB.format(cases={"m": (model,)}), tmp_path, env={"HF_ENDPOINT": unused_endpoint()}
    )
    assert down["m"].startswith(f"the hub cannot be reached for '{model}' (ConnectError")


def test_a_parallel_sweep_is_refused_a_sqlite_store_and_pointed_to_the_tracking_server(monkeypatch):
    # tracking=server reads its URL from MLFLOW_TRACKING_URI, which mlflow.set_tracking_uri (earlier tests) also sets
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        local = compose("config", overrides=["hydra/launcher=ray"], return_hydra_config=True)
        served = compose("config", overrides=["hydra/launcher=ray", "tracking=server"], return_hydra_config=True)
        serial = compose("config", return_hydra_config=True)
    with pytest.raises(ConfigError, match=r"make server.*tracking=server"):
        pipeline.check_store_for_launcher(local.tracking.uri, local.hydra.launcher._target_)
    pipeline.check_store_for_launcher(served.tracking.uri, served.hydra.launcher._target_)
    pipeline.check_store_for_launcher(serial.tracking.uri, serial.hydra.launcher._target_)  # one job at a time
