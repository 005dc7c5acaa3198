"""What a saved model costs, computed from the files on disk."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from quantbench import measure


def test_bits_per_weight_counts_every_tensor_of_a_quantized_layer(tmp_path):
    # a 4-bit layer of 256x512 with group size 128: packed int32 weights + fp16 scales + packed zeros
    out_f, in_f, group = 256, 512, 128
    save_file(
        {
            "layer.qweight": torch.zeros(in_f // 8, out_f, dtype=torch.int32),
            "layer.scales": torch.zeros(in_f // group, out_f, dtype=torch.float16),
            "layer.qzeros": torch.zeros(in_f // group, out_f // 8, dtype=torch.int32),
            "other.weight": torch.zeros(1000, dtype=torch.float32),  # not a quantized layer: not counted
        },
        tmp_path / "model.safetensors",
    )
    bpw = measure.bits_per_weight(tmp_path, {"layer": (out_f, in_f)})
    assert bpw == 4 + 16 / group + 4 / group


def test_unquantized_bf16_is_16_bits_per_weight(tmp_path):
    save_file({"a.weight": torch.zeros(64, 32, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    assert measure.bits_per_weight(tmp_path, {"a": (64, 32)}) == 16


def test_disk_and_weight_bytes(tmp_path):
    save_file({"w": torch.zeros(1000, dtype=torch.float16)}, tmp_path / "model.safetensors")
    (tmp_path / "tokenizer.json").write_text("x" * 100)
    assert measure.weight_bytes(tmp_path) == 2000
    assert measure.disk_bytes(tmp_path) > 2100  # weights + header + tokenizer


def test_peak_memory_sees_a_transient_allocation():
    """In a fresh process: a long test session's allocator may hand back memory it already holds."""
    import subprocess
    import sys

    script = (
        "import time, torch\n"
        "from quantbench.measure import PeakMemory\n"
        "with PeakMemory() as mem:\n"
        "    base = mem.peak_rss\n"
        "    block = torch.ones(256 * 2**20, dtype=torch.uint8)\n"
        "    block.add_(1)\n"
        "    time.sleep(0.2)\n"
        "    del block\n"
        "print(mem.peak_rss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) > 200 * 2**20


def test_linear_shapes_skip_the_output_head():
    net = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 4), "lm_head": torch.nn.Linear(4, 100)})
    assert measure.linear_shapes(net) == {"proj": (4, 8)}


def test_cpu_model_and_flags_come_from_the_first_cpu_listed(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f\n"
    )
    assert measure.cpu_info(cpuinfo) == ("AMD EPYC 7B13", {"fpu", "avx2", "fma"})
    assert measure.cpu_info(tmp_path / "absent") == ("unknown", set())


def test_runs_are_tagged_with_the_cpu_and_the_features_that_decide_kernel_paths():
    from quantbench.tracking.writer import Tracker

    tags = Tracker.environment_tags()
    model, flags = measure.cpu_info()
    assert tags["host.cpu"] == model
    assert set(tags["host.cpu_isa"].split()) == {f for f in measure.CPU_ISA_FLAGS if f in flags} or not flags


def test_the_largest_artifact_of_llama_31_8b_from_its_config_alone():
    from transformers import LlamaConfig

    from quantbench.embedded.random_shape import SHAPES

    skeleton = measure.skeleton_of_config(LlamaConfig(**SHAPES["llama-3.1-8b"]))
    assert measure.weights_bytes(skeleton, torch.bfloat16) == 2 * 8_030_261_248  # Meta's published parameter count
    assert measure.weights_bytes(skeleton, torch.float32) == 4 * 8_030_261_248  # fp16 saves in hardware.dtype
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # no weights were made


def test_a_folder_not_made_yet_is_measured_on_the_file_system_of_its_nearest_parent(tmp_path):
    import shutil

    (tmp_path / "a").mkdir()
    dev, free = measure.file_system(tmp_path / "a" / "not" / "made" / "yet")
    assert dev == tmp_path.stat().st_dev
    assert 0 < free <= shutil.disk_usage(tmp_path).total
