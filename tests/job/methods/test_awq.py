"""AWQ's calibration dtype: where `auto` calibrates in float32 instead of the hardware's bfloat16, that it says so
(tag), keys the artifact by it, and refuses a dtype it does not know before any work. The CPU's flags are the seam
(measure.cpu_info); the job itself, calibrated in float32 and saved in bfloat16, runs in test_int4 and the default
sweep on CPUs that emulate bfloat16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.job.methods import awq

CPU = OmegaConf.create({"device": "cpu", "dtype": "bfloat16"})
GPU = OmegaConf.create({"device": "cuda", "dtype": "float16"})
MODEL = SimpleNamespace(hidden_size=256, intermediate_size=512)  # the embedded model's widths


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU's feature flags as /proc/cpuinfo would list them."""

    def set_flags(*names: str) -> None:
        monkeypatch.setattr(measure, "cpu_info", lambda: ("a CPU", set(names)))

    return set_flags


@pytest.mark.parametrize(
    ("cpu_flags", "expected"),
    [(("avx2",), "float32"), (("avx2", "avx512f"), "float32"), (("avx512f", "avx512_bf16"), "bfloat16"),
     (("avx512f", "amx_bf16", "amx_tile"), "bfloat16")],
)  # fmt: skip
def test_auto_calibrates_in_float32_only_where_the_cpu_emulates_bfloat16(flags, cpu_flags, expected):
    flags(*cpu_flags)
    assert awq.calibration_dtype("auto", CPU) == expected
    assert awq.calibration_dtype("auto", GPU) == "float16"  # a GPU's dtype as configured
    assert awq.calibration_dtype("bfloat16", CPU) == "bfloat16"  # asked for: as asked


def test_the_resolved_dtype_is_tagged_and_keys_the_artifact(flags):
    knobs = OmegaConf.create({"calibration_dtype": "auto"})
    flags("avx2")
    emulated = awq.AWQ.compute_inputs(knobs, CPU)
    method = awq.AWQ("awq")
    method.validate(MODEL, CPU)
    assert method.tags()["awq_calibration_dtype"] == "float32"
    flags("amx_bf16")
    assert emulated == {"calibration_dtype": "float32"} != awq.AWQ.compute_inputs(knobs, CPU)


def test_an_unknown_calibration_dtype_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="method.calibration_dtype='int8'"):
        awq.AWQ("awq", calibration_dtype="int8").validate(MODEL, CPU)
