"""Energy over a measured window, from the hardware's own cumulative counters: NVML's total energy on NVIDIA GPUs
(`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver loaded) and Intel RAPL's package domains on
CPUs (`/sys/class/powercap/intel-rapl:<n>/energy_uj`, microjoules, wrapping at `max_energy_range_uj`).

Why a sampler rather than two readings: the load generator times its own window (the first request's start to the
last one's end, on CLOCK_MONOTONIC, which `time.monotonic` here reads too), in another process, after its warm-up.
`Sampler` reads the counter every `interval_s` with a monotonic timestamp, and `Sampler.joules(t0, t1)` interpolates
the counter at both ends. Where no counter is readable, `open_counter` says why; the caller tags that reason and logs
no energy figure (never an estimate).
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # a package; intel-rapl:0:0 (core, uncore, dram) are inside it


class Counter(Protocol):
    source: str  # what is read, for the energy_source tag

    def joules(self) -> float:
        """The counter's cumulative reading, in joules (monotonic: wrap-arounds are already added back)."""
        ...

    def close(self) -> None: ...


class RaplCounter:
    """The sum of every RAPL package domain under `root` (a fake folder in tests). Each domain's `energy_uj` wraps
    to 0 after `max_energy_range_uj`; a reading below the previous one adds that range back (readings are at most a
    fraction of a second apart, far less than one wrap, which takes minutes even at hundreds of watts)."""

    def __init__(self, root: Path = POWERCAP):
        self.zones = sorted(p for p in Path(root).glob("intel-rapl:*") if PACKAGE_ZONE.match(p.name))
        if not self.zones:
            raise OSError(f"no RAPL package domain under {root} (no intel-rapl:<n> folder: the kernel exposes none)")
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [self._raw(z) for z in self.zones]  # raises PermissionError where energy_uj is root-only
        self.offset = [0] * len(self.zones)
        self.source = "RAPL " + ", ".join(z.name for z in self.zones)

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules(self) -> float:
        total = 0
        for i, zone in enumerate(self.zones):
            raw = self._raw(zone)
            if raw < self.last[i]:
                self.offset[i] += self.ranges[i] + 1
            self.last[i] = raw
            total += raw + self.offset[i]
        return total / 1e6

    def close(self) -> None:
        pass


class NvmlCounter:
    """NVML's total energy of one GPU since the driver loaded (Volta and newer), through nvidia-ml-py."""

    def __init__(self, device: str):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        try:
            self.handle = _nvml_handle(pynvml, device)
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # NVMLError_NotSupported before Volta
        except Exception:
            pynvml.nvmlShutdown()
            raise
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.source = f"NVML total energy ({name.decode() if isinstance(name, bytes) else name})"

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # millijoules

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def _nvml_handle(pynvml, device: str):
    """The NVML handle of torch's `device` (cuda or cuda:<i>): by UUID, since NVML numbers every GPU of the machine
    while CUDA numbers only the visible ones (CUDA_VISIBLE_DEVICES)."""
    import torch

    index = torch.device(device).index or 0
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def open_counter(device: str, powercap: Path = POWERCAP) -> tuple[Counter | None, str | None]:
    """The energy counter for `device` (cuda...: NVML; cpu: RAPL), or None and why there is none."""
    try:
        if device.startswith("cuda"):
            return NvmlCounter(device), None
        return RaplCounter(powercap), None
    except Exception as exc:  # noqa: BLE001 - any failure to read a counter is a reason to report, not a crash
        kind = "NVML" if device.startswith("cuda") else "RAPL"
        return None, f"{kind}: {type(exc).__name__}: {exc}"[:300]


class Sampler:
    """Reads `counter` every `interval_s` in a thread, with `time.monotonic()` timestamps, between `start` and
    `stop` (a context manager)."""

    def __init__(self, counter: Counter, interval_s: float = 0.05):
        self.counter = counter
        self.interval_s = interval_s
        self.times: list[float] = []
        self.values: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> None:
        value = self.counter.joules()
        self.times.append(time.monotonic())
        self.values.append(value)

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self.read()

    def __enter__(self) -> Sampler:
        self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.read()

    def joules(self, t0: float, t1: float) -> float:
        """Energy between monotonic times t0 < t1, the counter interpolated linearly at both ends; ValueError where
        the samples do not cover the window."""
        if not self.times or t0 < self.times[0] or t1 > self.times[-1] or t1 <= t0:
            span = f"{self.times[0]:.3f}..{self.times[-1]:.3f}" if self.times else "none"
            raise ValueError(f"the energy samples ({span}) do not cover the window {t0:.3f}..{t1:.3f}")
        return self._at(t1) - self._at(t0)

    def _at(self, t: float) -> float:
        i = bisect.bisect_left(self.times, t)
        if self.times[i] == t or i == 0:
            return self.values[i]
        t_a, t_b = self.times[i - 1], self.times[i]
        v_a, v_b = self.values[i - 1], self.values[i]
        return v_a + (v_b - v_a) * (t - t_a) / (t_b - t_a) if t_b > t_a else v_b
