"""The transformers backend: a static KV cache by default, the path that really ran named in a tag, and a failing
static cache that falls back to the dynamic one out loud."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from quantbench.job import bench
from quantbench.job.bench.backends.hf import HfKnobs
from quantbench.job.bench.backends import hf as hf_backend
from quantbench.errors import ConfigError

CPU = OmegaConf.create({"name": "cpu", "device": "cpu", "dtype": "bfloat16", "memory_bandwidth_gbs": None})
# 24 output tokens: enough decode time that a full generation outlasts its paired one-token (TTFT) run on a busy
# 2-core machine (with 6, a repeat can come out shorter than its TTFT run and have no decode figure)
BASE = {"backend": "hf", "prompt_tokens": 8, "output_tokens": 24, "streams": [1, 2], "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module")
def tiny(tiny_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_root / "model"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(
        model_dir
    )


def test_hf_knobs_default_to_a_static_cache_and_reject_unknown_values():
    assert bench.plan(OmegaConf.create(BASE)).knobs["hf"] == HfKnobs(cache="static", compile="auto")
    assert bench.plan(OmegaConf.create({**BASE, "hf": {"cache": "dynamic"}})).knobs["hf"].cache == "dynamic"
    for bad in ({"cache": "paged"}, {"compile": "yes"}, {"kv_cache": "static"}):
        with pytest.raises(ConfigError, match="bench.hf"):
            bench.plan(OmegaConf.create({**BASE, "hf": bad}))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_each_cache_generates_exactly_the_planned_tokens_and_names_its_path(tiny, cache):
    model, tokenizer = tiny
    plan = bench.plan(OmegaConf.create({**BASE, "hf": {"cache": cache}}))
    result = hf_backend.BACKEND.run(plan, model, tokenizer, None, CPU)
    assert result.tags["bench_backend"] == "hf" and "bench_hf_fallback_reason" not in result.tags
    # on a CPU transformers does not compile: the tag says so, and why
    assert result.tags["bench_path"].startswith(f"transformers.generate, {cache} KV cache, eager decode (")
    for label in ("1_stream", "2_streams"):
        assert result.metrics[f"tokens_per_s_{label}_min"] <= result.metrics[f"tokens_per_s_{label}"] > 0
        assert result.metrics[f"decode_tokens_per_s_{label}_min"] <= result.metrics[f"decode_tokens_per_s_{label}"] > 0
    assert [len(r["seconds"]) for r in result.detail["runs"]] == [2, 2]
    assert [len(r["decode_tokens_per_s"]) for r in result.detail["runs"]] == [2, 2]


def test_the_roofline_counts_what_transformers_holds_here_float32_from_bf16_weights(tiny, tiny_root):
    """The fixture loads the bf16-stored model in float32, so each decode step reads twice the stored bytes."""
    from quantbench import measure

    model, tokenizer = tiny
    model_dir = tiny_root / "model"
    plan = bench.plan(OmegaConf.create({**BASE, "streams": [1], "hf": {"cache": "dynamic"}}))
    result = bench.run(plan, model, tokenizer, model_dir, OmegaConf.create({**CPU, "memory_bandwidth_gbs": 1.0}))
    assert sum(b for *_, b in result.loaded.values()) == 2 * measure.weight_bytes(model_dir)
    assert result.tags["roofline_bytes_basis"].startswith("cast to float32 by transformers: ")
    assert result.tags["roofline_speed_basis"] == "decode-only"


def test_a_static_cache_that_fails_falls_back_to_the_dynamic_one_and_says_why(tiny, monkeypatch):
    model, tokenizer = tiny
    real_generate = model.generate

    def generate_without_static_cache(*args, **kwargs):
        if kwargs.get("cache_implementation") == "static":
            raise ValueError("this model does not support a static cache")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate_without_static_cache)
    result = hf_backend.BACKEND.run(bench.plan(OmegaConf.create(BASE)), model, tokenizer, None, CPU)
    assert "does not support a static cache" in result.tags["bench_hf_fallback_reason"]
    assert result.tags["bench_path"].startswith("transformers.generate, dynamic KV cache")
    assert result.metrics["tokens_per_s_2_streams"] > 0


def test_the_reason_for_eager_decoding_follows_transformers_rule():
    class Quantizer:
        is_compileable = False

    class Model:
        device = torch.device("cuda")
        hf_quantizer = Quantizer()

    assert "Quantizer as not compileable" in hf_backend.why_not_compiled(Model(), HfKnobs())
    assert "static cache" in hf_backend.why_not_compiled(Model(), HfKnobs(cache="dynamic"))
    assert hf_backend.why_not_compiled(Model(), HfKnobs(compile="never")) == "bench.hf.compile=never"
    Model.hf_quantizer = None
    Model.device = torch.device("cpu")
    assert "not cpu" in hf_backend.why_not_compiled(Model(), HfKnobs())


def test_a_freed_model_is_reloaded_in_the_hardware_dtype_on_a_gpu_and_as_saved_on_cpu():
    """An AQLM folder declares float32 (for aqlm's CPU kernel); reloaded so on CUDA, aqlm's kernels refuse it and the
    HF fallback benchmark of an AQLM run fails."""
    gpu = OmegaConf.create({"name": "h200", "device": "cuda", "dtype": "bfloat16", "memory_bandwidth_gbs": 4800})
    assert hf_backend.reload_dtype(gpu) == torch.bfloat16
    assert hf_backend.reload_dtype(CPU) == "auto"
