"""The energy counters and the window arithmetic: RAPL against a fake sysfs folder (its seam), the sampler's
interpolation against a counter of known power, and NVML on a real GPU (`pytest -m gpu`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from quantbench.job.bench import energy

from helpers.run_if import run_if


def fake_rapl(root: Path, zones: dict[str, int], max_uj: int = 1000) -> Path:
    for name, uj in zones.items():
        (root / name).mkdir(parents=True)
        (root / name / "energy_uj").write_text(f"{uj}\n")
        (root / name / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root


def test_rapl_sums_the_package_domains_only(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": 100, "intel-rapl:1": 200, "intel-rapl:0:0": 50})
    counter = energy.RaplCounter(root)
    assert counter.source == "RAPL intel-rapl:0, intel-rapl:1"
    assert counter.joules() == pytest.approx(300e-6)


def test_rapl_adds_the_range_back_when_a_domain_wraps(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": 900}, max_uj=999)
    counter = energy.RaplCounter(root)
    first = counter.joules()
    (root / "intel-rapl:0" / "energy_uj").write_text("100\n")  # wrapped: 900 -> 999 -> 0 -> 100 is 200 uJ
    assert counter.joules() - first == pytest.approx(200e-6)


def test_no_rapl_folder_is_a_reason_not_a_figure(tmp_path):
    counter, why = energy.open_counter("cpu", tmp_path / "absent")
    assert counter is None and why.startswith("RAPL: OSError: no RAPL package domain")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_rapl_counter_is_a_reason(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": 1})
    (root / "intel-rapl:0" / "energy_uj").chmod(0)
    counter, why = energy.open_counter("cpu", root)
    assert counter is None and "PermissionError" in why


class Watts:
    """A counter of constant power: joules = watts x seconds since it was made."""

    source = "test"

    def __init__(self, watts: float):
        self.watts, self.t0 = watts, time.monotonic()

    def joules(self) -> float:
        return self.watts * (time.monotonic() - self.t0)

    def close(self) -> None:
        pass


def test_the_sampler_interpolates_the_window_it_covers():
    with energy.Sampler(Watts(100.0), interval_s=0.01) as sampler:
        time.sleep(0.2)
    t0, t1 = sampler.times[0] + 0.055, sampler.times[-1] - 0.033
    assert sampler.joules(t0, t1) == pytest.approx(100.0 * (t1 - t0), rel=1e-3)
    with pytest.raises(ValueError, match="do not cover"):
        sampler.joules(sampler.times[0] - 1, t1)


def instant_watts(pynvml, handle) -> float:
    """The board's power now (NVML_FI_DEV_POWER_INSTANT). nvmlDeviceGetPowerUsage is a one-second average on Hopper
    (nvidia-smi's power.draw.average): over a window that starts from idle it lags the energy counter."""
    (field,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
    if field.nvmlReturn == pynvml.NVML_SUCCESS:
        return field.value.uiVal / 1e3
    return pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3


@pytest.mark.gpu
@run_if(cuda=True)
def test_nvml_energy_of_a_busy_gpu_is_power_times_time():
    """NVML's counter over three seconds of matmuls, after two to reach a steady draw: positive, and within 25% of the
    board's own power readings x time."""
    import pynvml
    import torch

    counter, why = energy.open_counter("cuda")
    assert counter is not None, why
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)

    def busy(seconds: float, watts: list[float]) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            x.copy_((x @ x).clamp_(-1, 1))
            torch.cuda.synchronize()
            watts.append(instant_watts(pynvml, counter.handle))

    busy(2.0, [])  # from idle (~70 W on an H100) to the matmuls' draw
    watts: list[float] = []
    with energy.Sampler(counter, interval_s=0.02) as sampler:
        t0 = time.monotonic()
        busy(3.0, watts)
        t1 = time.monotonic()
    joules = sampler.joules(t0, t1)
    counter.close()
    assert joules > 0
    assert joules == pytest.approx(sum(watts) / len(watts) * (t1 - t0), rel=0.25)
