"""Throughput benchmarks. One module per backend (`hf`, `vllm`), chosen by `bench.backend`.

A backend module exposes `run(plan, model, tokenizer, model_dir, hardware) -> BenchResult`.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from quantbench.errors import ConfigError


@dataclass
class BenchPlan:
    backend: str
    prompt_tokens: int
    output_tokens: int
    streams: list[int]
    warmup: int
    repeats: int


@dataclass
class BenchResult:
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)  # every timing, for the benchmark JSON artifact


def backends() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")
                  and m.name not in ("roofline",))


def plan(cfg: DictConfig) -> BenchPlan | None:
    """Check every bench value before any model is loaded; None means no benchmark."""
    backend = str(cfg.backend)
    if backend == "none":
        return None
    if backend not in backends():
        raise ConfigError(f"bench.backend={backend!r} is not a benchmark backend; choose one of {backends() + ['none']}.")
    streams = list(cfg.streams)
    problems = []
    if int(cfg.prompt_tokens) < 1:
        problems.append(f"bench.prompt_tokens={cfg.prompt_tokens} (must be >= 1)")
    if int(cfg.output_tokens) < 1:
        problems.append(f"bench.output_tokens={cfg.output_tokens} (must be >= 1)")
    if not streams or any(int(s) < 1 for s in streams):
        problems.append(f"bench.streams={streams} (need one or more stream counts, each >= 1)")
    if int(cfg.repeats) < 1:
        problems.append(f"bench.repeats={cfg.repeats} (must be >= 1)")
    if int(cfg.warmup) < 0:
        problems.append(f"bench.warmup={cfg.warmup} (must be >= 0)")
    if problems:
        raise ConfigError("Nonsensical benchmark settings: " + "; ".join(problems) + ".")
    return BenchPlan(backend=backend, prompt_tokens=int(cfg.prompt_tokens), output_tokens=int(cfg.output_tokens),
                     streams=[int(s) for s in streams], warmup=int(cfg.warmup), repeats=int(cfg.repeats))


def load_backend(name: str):
    return importlib.import_module(f"quantbench.bench.{name}")


def run(plan: BenchPlan, model, tokenizer, model_dir: Path, hardware: DictConfig) -> BenchResult:
    """Benchmark with the planned backend: the in-memory model (hf) or the saved folder (vllm)."""
    return load_backend(plan.backend).run(plan, model, tokenizer, model_dir, hardware)


def stream_label(n: int) -> str:
    return f"{n}_stream" if n == 1 else f"{n}_streams"


def summarize(prefix: str, n_streams: int, values: list[float]) -> dict[str, float]:
    """median, min and max of repeated measurements, named `<prefix>_<n>_stream(s)[_min|_max]`."""
    label = f"{prefix}_{stream_label(n_streams)}"
    return {label: statistics.median(values), f"{label}_min": min(values), f"{label}_max": max(values)}
