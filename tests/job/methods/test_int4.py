"""awq (llm-compressor) and gptq (GPTQModel): bad settings are refused by name before any weights load; on the
embedded model the saved folder holds real 4-bit linear weights, reloads in a fresh process with plain transformers,
generates, and gives the logits of the model handed to the evaluator; the libraries leave the process as they found
it, so a later job of the same process (a Hydra multirun) is unaffected."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CACHE, ROOT
from quantbench import measure
from quantbench.job import calibration, pipeline
from quantbench.errors import ConfigError
from quantbench.job.methods.base import Method
from quantbench.job.models import SourceModel

CPU = OmegaConf.create({"device": "cpu", "dtype": "bfloat16"})
PROMPT = "Q: What is 14 plus 9? A: 23. Q: What is the job of Alan Quill? A:"
METHODS = ["awq", "gptq", "rtn"]
# What each method stores per linear layer instead of a 16-bit `weight`.
PACKED = {"awq": "weight_packed", "gptq": "qweight", "rtn": "weight_packed"}


def method_from_yaml(name: str, *overrides: str) -> Method:
    """The method as the CLI builds it: from conf/method/<name>.yaml, interpolations resolved."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", *overrides])
    return instantiate(cfg.method)


@pytest.fixture(scope="module")
def source(tiny_root) -> SourceModel:
    return SourceModel(name="tiny", reference="embedded:tiny", path_or_id=str(tiny_root / "model"))


# --- validation: cheap, before weights load ----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "override,needles",
    [
        (
            "method.group_size=96",
            ["group_size=96", "hidden_size=256", "intermediate_size=768", "[-1, 16, 32, 64, 128, 256]"],
        ),
        ("method.group_size=0", ["group_size=0", "-1"]),
        ("method.bits=5", ["bits=5", "supports"]),
    ],
)
def test_bad_settings_are_refused_by_name(source, name, override, needles):
    with pytest.raises(ConfigError) as err:
        method_from_yaml(name, override).validate(source.config(), CPU)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "name,bits,ok",
    [
        ("awq", 4, True),
        ("awq", 8, True),
        ("awq", 3, False),
        ("awq", 2, False),
        ("gptq", 2, True),
        ("gptq", 3, True),
        ("gptq", 4, True),
        ("gptq", 8, True),
        ("gptq", 6, False),
    ],
)
def test_supported_bit_widths(source, name, bits, ok):
    m = method_from_yaml(name, f"method.bits={bits}")
    if ok:
        m.validate(source.config(), CPU)
    else:
        with pytest.raises(ConfigError, match=f"bits={bits}"):
            m.validate(source.config(), CPU)


def test_gptq_names_its_kernel_backends_when_given_one_it_lacks(source):
    with pytest.raises(ConfigError, match="method.backend='machette'.*'marlin'"):
        method_from_yaml("gptq", "method.backend=machette").validate(source.config(), CPU)
    method_from_yaml("gptq", "method.backend=marlin").validate(
        source.config(), OmegaConf.merge(CPU, {"device": "cuda"})
    )


def test_gptq_refuses_a_cuda_only_kernel_backend_on_a_cpu_before_any_work(source):
    """As `method.backend=marlin hardware=cpu` did after a minute of quantizing: GPTQModel's 'Marlin kernel requires
    CUDA'. Its own kernels say where they run."""
    with pytest.raises(ConfigError, match=r"method.backend='marlin'.*\['cuda'\].*hardware=cpu is cpu"):
        method_from_yaml("gptq", "method.backend=marlin").validate(source.config(), CPU)
    for backend in ("auto", "torch", "torch_fused"):
        method_from_yaml("gptq", f"method.backend={backend}").validate(source.config(), CPU)


def test_gptq_refuses_act_order_together_with_group_aware_reordering(source):
    with pytest.raises(ConfigError, match="act_group_aware=false"):
        method_from_yaml("gptq", "method.desc_act=true").validate(source.config(), CPU)
    method_from_yaml("gptq", "method.desc_act=true", "method.act_group_aware=false").validate(source.config(), CPU)


def test_bad_group_size_fails_in_prepare_before_any_weights_load(tiny_root):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["method=awq", "method.group_size=100"])
    with pytest.raises(ConfigError, match="group_size=100"):
        pipeline.prepare(cfg)


@pytest.mark.parametrize(
    "name,library,fmt", [("awq", "llmcompressor", "compressed-tensors"), ("gptq", "gptqmodel", "gptq")]
)
def test_the_yaml_defaults_are_the_seeds_and_name_library_and_format(source, name, library, fmt):
    m = method_from_yaml(name)
    m.validate(source.config(), CPU)
    assert (m.bits, m.group_size, m.needs_calibration, m.seq_len) == (4, 128, True, 128)
    assert m.tags()["quant_library"] == library and m.tags()["quant_format"] == fmt
    assert m.tags()["quant_library_version"] == importlib.metadata.version(library)  # never "not installed"
    if name == "awq":
        assert m.zero_point is True
    else:
        assert (m.sym, m.desc_act) == (True, False)


# --- on the embedded model: one artifact per method, built once ---------------------------------------------------


@pytest.fixture(scope="module")
def environ_before() -> dict[str, str]:
    return dict(os.environ)


@pytest.fixture(scope="module")
def artifacts(source, environ_before, tmp_path_factory) -> dict[str, dict]:
    """awq, gptq, then rtn, in this process, with 16 calibration texts (rtn ignores them): the saved folder and the
    in-memory logits."""
    texts = calibration.texts(
        OmegaConf.create(dict(dataset="embedded:tiny", num_samples=16, seq_len=128, seed=0)), CACHE
    )
    ids = source.tokenizer()(PROMPT, return_tensors="pt").input_ids
    built = {}
    for name in METHODS:
        m = method_from_yaml(name)
        m.validate(source.config(), CPU)
        folder = tmp_path_factory.mktemp(name) / "model"
        model = m.quantize(source, folder, CPU, texts)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()
        kernel = type(dict(model.named_modules())["model.layers.0.mlp.down_proj"])
        built[name] = {
            "folder": folder,
            "logits": logits,
            "ids": ids,
            "kernel": f"{kernel.__module__}.{kernel.__name__}",
        }
        del model
    return built


def reload_in_fresh_process(folder: Path, ids: torch.Tensor) -> dict:
    """`AutoModelForCausalLM.from_pretrained(folder)` in a new interpreter: logits on `ids` and a greedy generation."""
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.inference_mode():\n"
        "    logits = m(input_ids=ids).logits.float()\n"
        "    out = m.generate(input_ids=ids, max_new_tokens=8, do_sample=False)\n"
        "print(json.dumps({'logits': logits.tolist(), 'new_tokens': out[0, ids.shape[1]:].tolist(),"
        " 'dtype': str(m.dtype)}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, f"{folder} does not reload with transformers:\n{out.stderr[-3000:]}"
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.e2e
@pytest.mark.parametrize("name", METHODS)
def test_saved_linear_weights_are_really_4_bit(artifacts, source, name):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shapes = measure.linear_shapes(AutoModelForCausalLM.from_config(source.config()))
    folder = artifacts[name]["folder"]
    assert 4.0 < measure.bits_per_weight(folder, shapes) <= 4.6
    stored = measure.safetensors_index(folder)
    for layer in shapes:
        assert stored[f"{layer}.{PACKED[name]}"][0] == "I32", layer  # packed integers...
        assert f"{layer}.weight" not in stored, layer  # ...and no 16-bit copy beside them
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    if name in ("awq", "rtn"):
        weights = qcfg["config_groups"]["group_0"]["weights"]
        assert (qcfg["quant_method"], qcfg["format"]) == ("compressed-tensors", "pack-quantized")
        assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, name == "rtn")
    else:
        assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (
            "gptq",
            4,
            128,
            True,
            False,
        )


@pytest.mark.e2e
@pytest.mark.parametrize("name", METHODS)
def test_the_folder_reloads_in_a_fresh_process_and_matches_the_evaluated_model(artifacts, name):
    art = artifacts[name]
    fresh = reload_in_fresh_process(art["folder"], art["ids"])
    reloaded = torch.tensor(fresh["logits"])
    assert reloaded.shape == art["logits"].shape
    # Same bits, possibly another kernel: well under a bf16 step of the logits' scale (|logits| reach ~15).
    assert (reloaded - art["logits"]).abs().max().item() < 0.1
    assert torch.equal(reloaded.argmax(-1), art["logits"].argmax(-1))
    assert len(fresh["new_tokens"]) > 0


@pytest.mark.e2e
def test_the_evaluated_models_run_int4_kernels_or_the_dequantized_artifact(artifacts):
    assert artifacts["gptq"]["kernel"].startswith("gptqmodel.nn_modules.qlinear.")
    # transformers decompresses compressed-tensors INT4 to the compute dtype on CPU: a plain Linear is expected.
    for name in ("awq", "rtn"):
        assert artifacts[name]["kernel"] in (
            "torch.nn.modules.linear.Linear",
            "compressed_tensors.linear.compressed_linear.CompressedLinear",
        )


@pytest.mark.e2e
def test_awq_without_zero_points_stores_symmetric_weights_as_exllama_needs(source, tmp_path):
    """method.zero_point=false: the artifact declares symmetric weights and stores no zero point, which is what
    `zero_points` tells the serving check (bench.check_serving lets Exllama take it)."""
    m = method_from_yaml("awq", "method.zero_point=false")
    m.validate(source.config(), CPU)
    assert m.zero_points is False and method_from_yaml("awq").zero_points is True
    texts = calibration.texts(
        OmegaConf.create(dict(dataset="embedded:tiny", num_samples=8, seq_len=128, seed=0)), CACHE
    )
    m.quantize(source, tmp_path / "model", CPU, texts)
    weights = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert weights["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert not [name for name in measure.safetensors_index(tmp_path / "model") if "zero_point" in name]


def test_rtn_is_the_uncalibrated_baseline_in_the_same_format_as_awq(source):
    rtn, awq = method_from_yaml("rtn"), method_from_yaml("awq")
    rtn.validate(source.config(), CPU)
    assert (rtn.bits, rtn.group_size, rtn.symmetric, rtn.needs_calibration) == (4, 128, True, False)
    assert rtn.tags()["quant_format"] == awq.tags()["quant_format"] == "compressed-tensors"
    assert rtn.tags()["quant_library"] == "llmcompressor"


@pytest.mark.e2e
def test_the_libraries_leave_the_process_as_they_found_it(artifacts, environ_before, source, tmp_path):
    """Hydra multiruns run jobs in one process: no environment variable, patch or session may outlive a job."""
    from llmcompressor.core import active_session
    from llmcompressor.pipelines.cache import IntermediatesCache

    from quantbench.upstream.quantizers import _skip_pin_memory

    now = dict(os.environ)
    changed = {
        k: (environ_before.get(k), now.get(k))
        for k in set(now) | set(environ_before)
        if k != "PYTEST_CURRENT_TEST" and now.get(k) != environ_before.get(k)
    }
    assert not changed, f"quantizing changed the environment: {changed}"
    assert IntermediatesCache.pin_memory is not _skip_pin_memory
    assert active_session().state.model is None  # the last job's model is not kept alive

    # A second awq job in the same process, after gptq ran, writes the same weights as the first.
    texts = calibration.texts(
        OmegaConf.create(dict(dataset="embedded:tiny", num_samples=16, seq_len=128, seed=0)), CACHE
    )
    again = tmp_path / "model"
    method_from_yaml("awq").quantize(source, again, CPU, texts)
    from safetensors.torch import load_file

    first, second = load_file(artifacts["awq"]["folder"] / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.e2e
def test_the_artifact_check_reloads_gptq_with_the_kernel_the_job_chose(artifacts):
    """method.backend reaches the fresh-process reload: on an offline H100, GPTQModel's default kernel there (Machete)
    downloads CUTLASS, so a check that ignored the choice would fail a good artifact."""
    from quantbench.job import fingerprint

    method = method_from_yaml("gptq", "method.backend=torch")
    assert method.loading_attributes() == {"backend": "torch"}
    assert method_from_yaml("gptq").loading_attributes() == {}  # auto: the saved config as it is
    art = artifacts["gptq"]
    ids = art["ids"][0].tolist()
    chosen = fingerprint.of_saved(art["folder"], ids, "cpu", loading_attributes=method.loading_attributes())
    reload_log = (art["folder"].parent / "fingerprint_reload.log").read_text()
    assert re.search(r"Kernel: selected\W+`TorchLinear`", reload_log), reload_log[-2000:]
    default = fingerprint.of_saved(art["folder"], ids, "cpu")  # GPTQModel's own choice on CPU: TorchAtenLinear
    assert "`TorchLinear`" not in (art["folder"].parent / "fingerprint_reload.log").read_text()
    # two kernels of one model: the same loss, greedy tokens apart only where logits nearly tie (and that depends on
    # the thread count: 1.0 with two OpenMP threads, 0.958 with one)
    nll_gap, same = chosen.compare(default)
    assert nll_gap < 0.01 and same >= 0.9, (nll_gap, same)
    with pytest.raises(RuntimeError, match="does not reload"):
        fingerprint.of_saved(art["folder"], ids, "cpu", loading_attributes={"backend": "no_such_kernel"})
