"""autoround_sym: bad settings are refused by name before any weights load; on the embedded model the saved folder
holds real 4-bit weights, reloads in a fresh process, and matches the model handed to the evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CACHE, run_cli
from quantbench import measure
from quantbench.job import calibration
from quantbench.errors import ConfigError
from quantbench.job.methods.autoround_sym import AutoRoundSym
from quantbench.job.models import SourceModel

CPU = OmegaConf.create({"device": "cpu", "dtype": "bfloat16"})
PROMPT = "Q: What is 14 plus 9? A: 23. Q: What is the job of Alan Quill? A:"


@pytest.fixture(scope="module")
def source(tiny_root) -> SourceModel:
    return SourceModel(name="tiny", reference="embedded:tiny", path_or_id=str(tiny_root / "model"))


def method(**knobs) -> AutoRoundSym:
    return AutoRoundSym("autoround_sym", **knobs)


# --- validation: cheap, before weights load ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs,needles",
    [
        (dict(group_size=100), ["group_size=100", "hidden_size=256", "intermediate_size=768", "128"]),
        (dict(group_size=0), ["group_size=0", "-1"]),
        (dict(bits=5), ["bits=5", "2, 3, 4, 8"]),
        (dict(bits=8, export_format="auto_awq"), ["bits=8", "auto_awq", "4 bits"]),
        (dict(export_format="gguf"), ["'gguf'", "auto_round", "auto_gptq", "llm_compressor", "auto_awq"]),
        (dict(iters=-1), ["iters=-1", ">= 0"]),
        (dict(seqlen=4096), ["seqlen=4096", "max_position_embeddings=512"]),
    ],
)
def test_bad_settings_are_refused_by_name(source, knobs, needles):
    with pytest.raises(ConfigError) as err:
        method(**knobs).validate(source.config(), CPU)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_the_yaml_defaults_validate_and_report_the_format(source):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["method=autoround_sym"])
    m = instantiate(cfg.method)
    m.validate(source.config(), cfg.hardware)
    assert (m.bits, m.group_size, m.seqlen, m.nsamples, m.export_format) == (4, 128, 512, 128, "auto_round")
    assert m.tags()["quant_library"] == "auto-round" and m.tags()["quant_format"] == "auto-round"
    assert method(export_format="llm_compressor").quant_format == "compressed-tensors"


def test_seqlen_and_nsamples_are_clamped_to_the_calibration_texts(source):
    texts = ["a b c d e f g h i j k l", "a b c d e f g h i j", "a b c", "a b c d e f g h i j k l m n"]
    tokenizer = source.tokenizer()
    chosen, seqlen = method(seqlen=512, nsamples=3)._fit_calibration(texts, tokenizer)
    assert len(chosen) == 3 and "a b c" not in chosen  # the longest seqlen at which 3 texts still qualify
    assert seqlen == min(len(tokenizer(t).input_ids) for t in chosen) == 10
    assert method(seqlen=8, nsamples=3)._fit_calibration(texts, tokenizer) == (texts[:2] + texts[3:], 8)
    with pytest.raises(ConfigError, match="too short"):
        method(nsamples=4)._fit_calibration(texts, tokenizer)


def test_no_calibration_texts_is_refused_rather_than_fetching_the_hub_default(source, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        method().quantize(source, tmp_path / "model", CPU, calibration=None)


# --- quantize the embedded model once per module (few iters and samples: seconds, not minutes) -----------------


def _texts() -> list[str]:
    return calibration.texts(OmegaConf.create(dict(dataset="embedded:tiny", num_samples=16, seq_len=64, seed=0)), CACHE)


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """(folder, in-memory model, process state before, process state after) for the default export format."""
    out = tmp_path_factory.mktemp("autoround") / "model"
    before = _process_state()
    model = method(iters=4, nsamples=16, seqlen=64, seed=0).quantize(source, out, CPU, _texts())
    return out, model, before, _process_state()


def _process_state() -> dict:
    return {
        "env": dict(os.environ),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "precision": torch._tensor_str.PRINT_OPTS.precision,
        "rng": torch.get_rng_state(),
    }


@pytest.mark.e2e
def test_saved_weights_are_really_4_bit(quantized, source):
    folder, _, _, _ = quantized
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        fp_model = AutoModelForCausalLM.from_config(source.config())
    bpw = measure.bits_per_weight(folder, measure.linear_shapes(fp_model))
    assert 4.0 < bpw <= 4.6, bpw
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"]) == ("auto-round", 4, 128, True)


@pytest.mark.e2e
def test_saved_folder_reloads_in_a_fresh_process_and_matches_the_evaluated_model(quantized, source, tmp_path):
    folder, model, _, _ = quantized
    tokenizer = source.tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits.float()
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "ref = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    diff = (m(ref['ids']).logits.float() - ref['logits']).abs().max().item()\n"
        "out = m.generate(ref['ids'], max_new_tokens=3, do_sample=False)\n"
        "print('KERNEL', type(m.model.layers[0].mlp.up_proj).__name__)\n"
        "print('DIFF', diff)\n"
        "print('GENERATED', out.shape[1] - ref['ids'].shape[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert lines["KERNEL"] != "Linear"  # packed 4-bit layers, not dequantized nn.Linear
    assert float(lines["DIFF"]) < 1e-2
    assert int(lines["GENERATED"]) >= 1


@pytest.mark.e2e
def test_the_evaluated_model_is_a_generating_transformers_model(quantized):
    _, model, _, _ = quantized
    assert model.device.type == "cpu" and model.config.quantization_config
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


@pytest.mark.e2e
def test_process_wide_settings_are_left_as_they_were(quantized):
    _, _, before, after = quantized
    assert after["env"] == before["env"]  # auto-round sets CUBLAS_WORKSPACE_CONFIG
    assert after["deterministic"] == before["deterministic"]  # and turns on deterministic algorithms
    assert after["precision"] == before["precision"]  # and torch print options
    assert torch.equal(after["rng"], before["rng"])  # and reseeds the global RNGs


@pytest.mark.e2e
def test_auto_round_singletons_let_go_of_the_model(quantized):
    """A multirun's next job can only free this job's model if auto-round's process-wide contexts drop it."""
    from auto_round.context.compress import CompressContext
    from auto_round.context.model import ModelContext

    assert ModelContext not in ModelContext._instances and CompressContext not in CompressContext._instances


@pytest.mark.e2e
def test_auto_gptq_export_is_evaluated_from_its_saved_folder(source, tmp_path):
    """auto-round's own in-memory model raises on forward for this format; the reloaded one must run."""
    m = method(iters=0, nsamples=8, seqlen=64, export_format="auto_gptq")
    model = m.quantize(source, tmp_path / "model", CPU, _texts())
    assert json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.e2e
def test_a_cli_job_logs_auto_round_tags_and_4_bit_weights(tiny_root, tmp_path):
    store = run_cli(
        "method=autoround_sym",
        "method.iters=2",
        "method.nsamples=16",
        "eval=none",
        "bench=none",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
    )
    (run,) = store.runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["quant_library"] == "auto-round" and run.data.tags["quant_format"] == "auto-round"
    assert 4.0 < run.data.metrics["bits_per_weight"] <= 4.6
    kernel = run.data.tags["eval_kernel"]
    assert "QuantLinear" in kernel and "torch.nn.modules.linear.Linear" not in kernel  # packed 4-bit layers
