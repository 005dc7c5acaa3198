"""The memory-bandwidth roofline (quantbench.job.bench.roofline): what a decode step reads, by hand, on folders small
enough to count; what each backend's basis says; a device's bandwidth measured once."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from helpers.model_folders import CPU, small_model_folder
from quantbench.job import bench
from quantbench.job.bench import BenchResult, roofline
from quantbench.job.bench.backends.base import Backend


def test_decode_bytes_reads_one_embedding_row_per_stream_and_the_head_in_full(tmp_path):
    b = roofline.decode_bytes(small_model_folder(tmp_path))
    assert b.fixed == 1600 + 256  # LM head + layer; the embedding table is not read whole
    assert b.per_stream == 16  # one bf16 row of 8
    assert b.kv_per_token == 2 * 2 * 2 * 2 * 2  # K and V * layers * kv heads * head dim * 2 bytes


def test_a_tied_head_is_the_embedding_table_read_in_full(tmp_path):
    b = roofline.decode_bytes(small_model_folder(tmp_path, tied=True))
    assert (b.fixed, b.per_stream) == (1600 + 256, 0)


def test_roofline_tokens_per_s_by_hand(tmp_path):
    b = roofline.decode_bytes(small_model_folder(tmp_path))
    # prompt 100 + output 50 -> average context 125 tokens -> 125 * 32 = 4000 KV bytes per stream
    # 1 stream: 1856 + 1 * (16 + 4000) = 5872 bytes per step at 1 GB/s -> 1e9 / 5872 tokens/s
    assert roofline.tokens_per_s(b, 1, 100, 50, 1.0) == pytest.approx(1e9 / 5872)
    # 4 streams: 1856 + 4 * 4016 = 17920 bytes per step -> 4 tokens per step
    assert roofline.tokens_per_s(b, 4, 100, 50, 1.0) == pytest.approx(4e9 / 17920)


# At 1.64416 GB/s the roofline of that model is round: 1.64416e9 / 5872 = 280,000 tokens/s at 1 stream and
# 4 * 1.64416e9 / 17920 = 367,000 tokens/s at 4 streams.
ROUND_BW = OmegaConf.create({"device": "cuda", "memory_bandwidth_gbs": 1.64416})


def test_roofline_fraction_is_the_decode_only_median_over_the_roofline(tmp_path):
    measured = {
        "tokens_per_s_1_stream": 56_000.0,
        "decode_tokens_per_s_1_stream": 70_000.0,
        "tokens_per_s_4_streams": 91_750.0,
        "decode_tokens_per_s_4_streams": 183_500.0,
    }
    metrics, tags = roofline.metrics(
        roofline.decode_bytes(small_model_folder(tmp_path)), 100, 50, [1, 4], measured, ROUND_BW
    )
    assert tags == {"memory_bandwidth_source": "datasheet", "roofline_speed_basis": "decode-only"}
    assert metrics["memory_bandwidth_gbs"] == 1.64416
    assert metrics["roofline_tokens_per_s_1_stream"] == pytest.approx(280_000)
    assert metrics["roofline_tokens_per_s_4_streams"] == pytest.approx(367_000)
    assert metrics["roofline_fraction_1_stream"] == pytest.approx(0.25)  # 70,000 / 280,000, not 56,000's 0.2
    assert metrics["roofline_fraction_4_streams"] == pytest.approx(0.5)  # 183,500 / 367,000, not 91,750's 0.25


def test_without_a_decode_only_figure_the_roofline_falls_back_to_end_to_end_and_says_so(tmp_path):
    b = roofline.decode_bytes(small_model_folder(tmp_path))
    mixed = {
        "tokens_per_s_1_stream": 56_000.0,
        "decode_tokens_per_s_1_stream": 70_000.0,
        "tokens_per_s_4_streams": 91_750.0,
    }
    metrics, tags = roofline.metrics(b, 100, 50, [1, 4], mixed, ROUND_BW)
    assert (metrics["roofline_fraction_1_stream"], metrics["roofline_fraction_4_streams"]) == pytest.approx(
        (0.25, 0.25)
    )
    assert tags["roofline_speed_basis"] == "1_stream: decode-only, 4_streams: end-to-end"
    metrics, tags = roofline.metrics(b, 100, 50, [1], {"tokens_per_s_1_stream": 56_000.0}, ROUND_BW)
    assert metrics["roofline_fraction_1_stream"] == pytest.approx(0.2) and tags["roofline_speed_basis"] == "end-to-end"


def test_bench_run_adds_the_roofline_to_any_backend_and_survives_without_one(tmp_path, monkeypatch):
    md = small_model_folder(tmp_path)
    measured = {"tokens_per_s_1_stream": 56_000.0, "decode_tokens_per_s_1_stream": 70_000.0}
    fake = type("Fake", (Backend,), {"run": staticmethod(lambda *a: BenchResult(dict(measured)))})
    monkeypatch.setattr(bench, "load_backend", lambda name: fake)
    plan = bench.BenchPlan("hf", 100, 50, [1], 0, 1)
    result = bench.run(plan, None, None, md, ROUND_BW)
    assert result.metrics["roofline_fraction_1_stream"] == pytest.approx(0.25)
    assert result.tags["roofline_speed_basis"] == "decode-only"
    # a backend that says nothing about what it reads: the stored bytes, and the tag says why
    assert result.tags["roofline_bytes_basis"] == "stored bytes: what the unnamed backend reads is not determined here"
    (md / "model.safetensors").unlink()
    result = bench.run(plan, None, None, md, ROUND_BW)
    assert result.metrics == measured and "safetensors" in result.tags["roofline_unavailable"]


# --- what a decode step reads: stored bytes, or what the backend made of them -----------------------------------


class _Decompressed(torch.nn.Module):
    """What transformers holds after loading the compressed-tensors `small_model_folder`: the embedding and head as stored
    (bf16 100x8, 1600 B each) and the 4-bit layer decompressed into a plain bf16 8x8 Linear (128 B)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(100, 8, dtype=torch.bfloat16)
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = torch.nn.Module()
        self.model.layers[0].mlp.up_proj = torch.nn.Linear(8, 8, bias=False, dtype=torch.bfloat16)
        self.lm_head = torch.nn.Linear(8, 100, bias=False, dtype=torch.bfloat16)


def _packed_dir(tmp_path, quant_method: str):
    """`small_model_folder` with its one layer stored 4-bit: 8x8 weights packed into int32 8x1 (32 B) + bf16 scales (16 B)."""
    tmp_path.mkdir(exist_ok=True)
    md = small_model_folder(tmp_path, quantization={"quant_method": quant_method})
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(100, 8, dtype=torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight_packed": torch.zeros(8, 1, dtype=torch.int32),
            "model.layers.0.mlp.up_proj.weight_scale": torch.zeros(8, 1, dtype=torch.bfloat16),
            "lm_head.weight": torch.zeros(100, 8, dtype=torch.bfloat16),
        },
        md / "model.safetensors",
    )
    return md


def test_a_format_transformers_decompresses_is_read_at_its_decompressed_size(tmp_path, monkeypatch):
    md = _packed_dir(tmp_path, "compressed-tensors")
    stored = roofline.decode_bytes(md)
    assert (stored.fixed, stored.per_stream) == (1600 + 32 + 16, 16)
    loaded = roofline.tensor_index(_Decompressed())
    fake = type(
        "Fake",
        (Backend,),
        {
            "run": staticmethod(
                lambda *a: BenchResult(
                    {"decode_tokens_per_s_1_stream": 500_000.0}, {"bench_backend": "hf"}, loaded=loaded
                )
            )
        },
    )
    monkeypatch.setattr(bench, "load_backend", lambda name: fake)
    # held: head 1600 + layer 128 read whole, one 16 B embedding row and 125 * 32 B of KV: 5744 B per step, so at
    # 5.744 GB/s the roofline is 1,000,000 tokens/s (the stored 5664 B would give 1,014,124)
    hw = OmegaConf.create({"device": "cpu", "memory_bandwidth_gbs": 5.744})
    result = bench.run(bench.BenchPlan("hf", 100, 50, [1], 0, 1), None, None, md, hw)
    assert result.metrics["roofline_tokens_per_s_1_stream"] == pytest.approx(1_000_000)
    assert result.metrics["roofline_fraction_1_stream"] == pytest.approx(0.5)
    assert result.detail["roofline"]["decode_bytes"]["fixed"] == 1728
    assert result.tags["roofline_bytes_basis"] == (
        "dequantized to bfloat16 by transformers: it decompresses compressed-tensors weights into plain Linear layers "
        "(3,328 B held, 3,248 B stored)"
    )


def test_aqlm_on_cpu_is_read_in_float32_and_the_basis_says_why(tmp_path):
    md = _packed_dir(tmp_path, "aqlm")
    loaded = roofline.tensor_index(_Decompressed().float())  # every tensor of the stand-in at 4 bytes: 6656 B
    index, basis = roofline.bytes_read(md, BenchResult({}, {"bench_backend": "hf"}, loaded=loaded), CPU)
    assert index is loaded
    assert basis == (
        "float32 by transformers on cpu: quantbench loads AQLM in float32 on CPU for aqlm's float32 CPU "
        "kernels, codebooks, scales, embeddings and head included (6,656 B held, 3,248 B stored)"
    )


def test_the_stored_bytes_stay_where_the_backend_reads_them_or_what_it_reads_is_unknown(tmp_path):
    md = _packed_dir(tmp_path / "ct", "compressed-tensors")
    index, basis = roofline.bytes_read(md, BenchResult({}, {"bench_backend": "vllm"}), CPU)
    assert sum(b for *_, b in index.values()) == 3248
    assert basis == "stored bytes: vLLM serves the saved tensors with its own kernels"
    emulated = {"bench_backend": "vllm", "slow_kernel_reason": "EmulationNvFp4LinearKernel: NVFP4 emulated in 16-bit"}
    assert roofline.bytes_read(md, BenchResult({}, emulated), CPU)[1] == (
        "stored bytes, fewer than vLLM reads: EmulationNvFp4LinearKernel: NVFP4 emulated in 16-bit; the 16-bit "
        "weights it dequantizes to on every call are not counted"
    )
    bnb = _packed_dir(tmp_path / "bnb", "bitsandbytes")
    held = roofline.tensor_index(_Decompressed())
    index, basis = roofline.bytes_read(bnb, BenchResult({}, {"bench_backend": "hf"}, loaded=held), CPU)
    assert sum(b for *_, b in index.values()) == 3248 and basis.startswith("stored bytes: whether bitsandbytes'")


def test_the_tensors_a_model_holds_count_a_tied_head_once():
    model = _Decompressed()
    model.lm_head.weight = model.model.embed_tokens.weight
    index = roofline.tensor_index(model)
    assert sorted(index) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    assert index["model.embed_tokens.weight"] == ("bfloat16", [100, 8], 1600)


def test_cpu_bandwidth_is_measured_once_and_cached_by_cpu_model(tmp_path, monkeypatch):
    cache = tmp_path / "memory_bandwidth.json"
    monkeypatch.setattr(roofline, "measure_bandwidth_gbs", lambda device: 12.5)
    assert roofline.memory_bandwidth(CPU, cache) == (12.5, "measured")
    assert json.loads(cache.read_text())[roofline.cpu_model()]["gbs"] == 12.5

    def no_second_measurement(device):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(roofline, "measure_bandwidth_gbs", no_second_measurement)
    assert roofline.memory_bandwidth(CPU, cache) == (12.5, "measured")


def test_a_gpu_without_a_datasheet_figure_is_measured_on_the_gpu_and_cached_by_its_name(tmp_path, monkeypatch):
    """Not the host's memory: a decode step on a GPU reads the card's own."""
    cache, seen = tmp_path / "memory_bandwidth.json", []
    monkeypatch.setattr(roofline, "measure_bandwidth_gbs", lambda device: seen.append(device) or 2961.3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = OmegaConf.create({"device": "cuda", "memory_bandwidth_gbs": None})
    assert roofline.memory_bandwidth(gpu, cache) == (2961.3, "measured") and seen == ["cuda"]
    entry = json.loads(cache.read_text())["NVIDIA H100 80GB HBM3 (GPU)"]
    assert entry["gbs"] == 2961.3 and "on cuda" in entry["method"]
    roofline.memory_bandwidth(gpu, cache)
    assert seen == ["cuda"]  # cached
    roofline.memory_bandwidth(CPU, cache)
    assert seen == ["cuda", "cpu"]  # the host is another key: measured on its own


def test_bandwidth_measurement_counts_read_and_write_bytes(monkeypatch):
    """A copy of 2**24 = 16,777,216 bytes that takes 1 ms moves twice that (read + write): 33.554432 GB/s, not the
    16.777216 GB/s of counting one side."""
    clock = iter([10.000, 10.001, 20.000, 20.001])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(clock))
    assert roofline.measure_bandwidth_gbs(size_bytes=2**24, repeats=2) == pytest.approx(33.554432, rel=1e-6)
