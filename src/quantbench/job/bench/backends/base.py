"""The interface every benchmark backend implements (as methods/base.py's `Method` is for methods).

A backend is one module that defines a `Backend` subclass and an instance of it named `BACKEND`. Its knobs are a
dataclass (`Knobs`): `schema` turns it into the typed sub-config `bench.<name>` (Hydra refuses unknown keys and
wrong types), `bench.plan` reads it into `plan.knobs[<name>]` and asks `knob_problems` for the ranges, the pipeline
asks `check` before any weights load, and `bench.run` calls `run`. The backends in this folder are found by module
name; one outside quantbench is named in the QUANTBENCH_BACKENDS environment variable (`bench/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from quantbench.job.bench.speed import BenchPlan, BenchResult


@dataclass
class NoKnobs:
    """A backend without knobs: `bench.<name>` takes no keys."""


class Backend:
    """Measure tokens/s of a model for a `BenchPlan`; `speed_metrics` turns its timings into the shared metrics, and
    `bench.run` adds the roofline."""

    name: ClassVar[str] = ""  # bench.backend=<name>; also the key of its knobs, bench.<name>
    Knobs: ClassVar[type] = NoKnobs  # a dataclass with a default for every field
    # Serves the saved folder itself (vLLM), so the pipeline may free the in-memory model before `run`.
    loads_from_disk: ClassVar[bool] = False
    # Whether `bench.run` sets its speeds against the memory-bandwidth roofline (per stream count: tokens_per_s_<n>)
    roofline: ClassVar[bool] = True

    def knobs(self, plan: BenchPlan) -> Any:
        """This backend's knobs in `plan`; the defaults where the plan was made by hand without them."""
        return plan.knobs.get(self.name) or self.Knobs()

    def knob_problems(self, knobs: Any, plan: BenchPlan) -> list[str]:
        """`bench.<name>.<key>=value (why)` for each knob out of range. Asked by `bench.plan` of every backend, chosen
        or not (vLLM falls back to hf's knobs), so that a sweep over bench.backend fails before its first job."""
        return []

    def check(
        self,
        plan: BenchPlan,
        hardware: Any,
        zero_points: bool,
        serving_format: str | None = None,
        quantized_lm_head: bool = False,
    ) -> None:
        """Raise ConfigError for what this backend cannot serve with these knobs on this hardware, for a method whose
        weights have a zero point per group (`zero_points`, Method.zero_points), in a format with device needs
        (`serving_format`, Method.serving_format), with its LM head quantized or not: asked of the chosen backend
        before any model is loaded, so that a refusal costs nothing."""

    def libraries(self) -> dict[str, str]:
        """What serves the benchmark beyond torch and transformers (a wheel, a setting that picks its kernels): part
        of the bench stage's key, so that resume never reuses a speed another version of it measured."""
        return {}

    def run(self, plan: BenchPlan, model: Any, tokenizer: Any, model_dir: Path, hardware: Any) -> BenchResult:
        """Benchmark `model` (None where the pipeline freed it: `loads_from_disk`) or the saved `model_dir`."""
        raise NotImplementedError
