"""Configuration is the interface: every option of every group composes, and builds what it names."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from conftest import ROOT, run_cli

CONF = ROOT / "conf"
GROUPS = ["method", "model", "eval", "quality", "hardware", "bench", "calibration", "tracking"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    from omegaconf import OmegaConf

    cfg = compose_with(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg[group].name == option


@pytest.mark.parametrize("option", options("method"))
def test_every_method_config_builds_its_method(option):
    from quantbench.job.methods.base import Method

    method = instantiate(compose_with(f"method={option}").method)
    assert isinstance(method, Method) and method.name == option


def test_the_defaults_are_the_offline_embedded_setup():
    cfg = compose_with()
    assert (cfg.method.name, cfg.model.name, cfg.eval.name, cfg.hardware.name, cfg.tracking.name) == (
        "fp16",
        "tiny",
        "tiny",
        "cpu",
        "local",
    )
    assert cfg.tracking.uri.startswith("sqlite:///") and cfg.tracking.uri.endswith("mlruns/mlflow.db")


def test_hardware_configs_carry_datasheet_bandwidth():
    for option in options("hardware"):
        hw = compose_with(f"hardware={option}").hardware
        if hw.device == "cuda":
            assert hw.memory_bandwidth_gbs > 500 and hw.memory_gb >= 24


def test_help_explains_usage():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "python run.py -m method=fp16,bnb_nf4" in out.stdout
    for group in GROUPS:
        assert f"{group}:" in out.stdout


def test_the_seed_study_is_one_config():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=seed"], return_hydra_config=True)
    assert cfg.model.pretrained == "meta-llama/Llama-3.1-8B-Instruct"
    assert list(cfg.eval.tasks) == ["mmlu", "arc_challenge"] and cfg.eval.num_fewshot == 0
    assert (cfg.bench.backend, cfg.bench.prompt_tokens, cfg.bench.output_tokens) == ("vllm", 100, 250)
    assert list(cfg.bench.streams) == [1, 8] and cfg.repeats == 3
    methods = cfg.hydra.sweeper.params.method.split(",")
    assert methods == ["fp16", "bnb_nf4", "awq", "gptq", "autoround_sym", "aqlm_2bit_pretrained"]
    assert all((CONF / "method" / f"{m}.yaml").exists() for m in methods)


def test_the_embedded_model_gets_shorter_searches_and_real_models_the_methods_own():
    """conf/method_model/<method>_<model>.yaml: AWQ's grid and auto-round's iterations are cut on the embedded model
    only; an experiment's model and the command line get the method's own settings."""
    assert (compose_with("method=awq").method.n_grid, compose_with("method=autoround_sym").method.iters) == (10, 50)
    assert compose_with("method=autoround_sym", "method.iters=200").method.iters == 200
    assert compose_with("method=awq", "model=llama-3.1-8b-shape").method.n_grid == 20
    assert compose_with("experiment=seed", "method=autoround_sym").method.iters == 200
    for option in options("method_model"):  # each names a method and a model that exist
        method, model = next((m, option[len(m) + 1 :]) for m in options("method") if option.startswith(f"{m}_"))
        assert model in options("model"), option


def test_the_seed_study_in_8b_shapes_needs_no_hub_and_scores_no_accuracy():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=seed_shape"], return_hydra_config=True)
    assert cfg.model.pretrained == "embedded:llama-3.1-8b-shape"
    assert cfg.eval.tasks == [] and cfg.calibration.dataset == "embedded:tiny"
    assert (cfg.bench.backend, cfg.bench.prompt_tokens, cfg.bench.output_tokens) == ("vllm", 100, 250)
    assert cfg.tracking.log_model == "none" and cfg.hardware.device == "cuda"
    assert cfg.hardware.memory_bandwidth_gbs is None  # the bound at the card's measured bandwidth, as the seed's
    assert cfg.hydra.sweeper.params.method.split(",") == [
        "fp16",
        "bnb_nf4",
        "awq",
        "gptq",
        "autoround_sym",
        "aqlm_2bit",
    ]


def test_the_readme_runs_the_seed_study_with_a_command_hydra_accepts():
    """The README's GPU command, as written, composes (`+experiment=seed` once did not: the defaults list has it)."""
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if "run.py -m experiment=" in line:
            overrides = line.split("run.py -m ", 1)[1].split("#")[0].split()
            compose_with(*overrides)
            break
    else:
        pytest.fail("the README shows no `run.py -m experiment=...` command")


@pytest.mark.parametrize("group", ["experiment", "search", "debug"])
def test_a_group_that_is_off_by_default_refuses_an_option_it_lacks_and_lists_its_own(group):
    """experiment, search and debug select nothing by default; a misspelt option stops the command, naming the
    options there are. (As `optional` defaults they once dropped it in silence: `experiment=seed_shap` ran the
    embedded model's default sweep.)"""
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/nope'") as refused:
        compose_with(f"{group}=nope")
    assert all(option in str(refused.value) for option in options(group)), str(refused.value)
    assert options(group)


@pytest.mark.parametrize(
    "override, message",
    [
        ("bench.nonexistent=1", "Key 'nonexistent' not in 'BenchConfig'"),
        ("bench.repeats=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("hardware.memory_bandwidth_gbs=fast", "could not be converted to Float"),
    ],
)
def test_hydra_refuses_unknown_keys_and_wrong_types_before_any_run(tmp_path, override, message):
    """The groups' typed schemas (quantbench.schema): a typo or a wrong type stops the command before any job, so
    no MLflow run (nor store) is made; the message names the key and what it expected."""
    store = run_cli(override, mlruns=tmp_path / "mlruns", workdir=tmp_path, check=False, timeout=120)
    assert store.result.returncode != 0
    assert message in store.result.stdout and override.split("=")[0] in store.result.stdout
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    "group", ["model", "eval", "quality", "hardware", "bench", "calibration", "tracking", "policy"]
)
def test_every_option_of_a_typed_group_starts_from_its_schema(group):
    for option in options(group):
        text = (CONF / group / f"{option}.yaml").read_text()
        assert f"- {group}_schema" in text or "defaults:\n  - heldout" in text, f"{group}/{option}.yaml"


def test_debug_presets_rerun_requantize_and_log_apart_from_the_sweeps():
    """debug=default (conf/debug/, last in the defaults list, so it wins over an experiment): force, no quantized-model
    cache, quantbench's loggers at DEBUG, its own experiment; debug=fast adds the shortest path through every stage."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=seed_shape", "debug=default"], return_hydra_config=True)
    assert cfg.force is True and cfg.quantized_cache.enabled is False
    assert cfg.tracking.experiment == "debug-llama-3.1-8b-shape" and list(cfg.hydra.verbose) == ["quantbench"]
    assert cfg.bench.output_tokens == 250  # debug=default changes how a job runs, not what it measures

    fast = compose_with("debug=fast", "bench=seed", "eval=seed")
    assert fast.force is True and fast.tracking.experiment == "debug-tiny"
    assert (fast.calibration.num_samples, fast.eval.limit, fast.quality.num_tokens, fast.repeats) == (8, 10, 256, 1)
    assert (fast.bench.prompt_tokens, fast.bench.output_tokens, list(fast.bench.streams)) == (16, 16, [1])
    assert (fast.bench.backend, fast.eval.tasks) == ("vllm", ["mmlu", "arc_challenge"])  # what to run stays


@pytest.mark.e2e
def test_debug_fast_runs_every_stage_briefly_into_its_own_experiment_without_the_cache(tiny_root, tmp_path):
    """One debug job: it quantizes afresh (no quantized-model cache), runs every stage with the shortened settings
    (logged as params), lands in the debug experiment and nowhere else, and its log shows quantbench's DEBUG lines.
    (That force=true reruns a FINISHED job is tests/test_resume.py's to show; debug=default sets it, above.)"""
    store = run_cli("method=rtn", "debug=fast", mlruns=tmp_path / "mlruns", workdir=tmp_path, timeout=600)
    (run,) = store.runs("debug-tiny")
    assert run.info.status == "FINISHED" and run.data.tags["cache"] == "off"
    assert "Quantizing" in store.result.stdout and "[DEBUG]" in store.result.stdout
    params, metrics = run.data.params, run.data.metrics
    # eval.limit is a float in its schema (a count or a fraction; OmegaConf 2.3 has no int | float): 10 is logged 10.0
    assert (params["eval.limit"], params["calibration.num_samples"], params["bench.streams"]) == ("10.0", "8", "[1]")
    assert "tokens_per_s_1_stream" in metrics and "tokens_per_s_8_streams" not in metrics
    assert "quality_kl_mean" in metrics and "tiny_facts_acc" in metrics
    assert store.client.get_experiment_by_name("quantbench-tiny") is None
