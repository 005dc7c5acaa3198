"""Throughput benchmarks. One module per backend in `bench/backends/` (`hf`, `vllm`), chosen by
`bench.backend`; what they share (plan, result, speed formula) is in `bench/speed.py`, the interface they implement
in `bench/backends/base.py`.

A backend module defines a `Backend` subclass and `BACKEND`, an instance of it: its knobs (a dataclass, the typed
sub-config `bench.<name>`), their ranges, its refusals before any work (`check`) and
`run(plan, model, tokenizer, model_dir, hardware) -> BenchResult`, which turns its timings into metrics with
`speed_metrics` (end-to-end and decode-only tokens/s, TTFT: one formula for every backend). `run()` here adds the
memory-bandwidth roofline (bench/roofline.py) to whatever the backend measured, so every backend reports it.

Adding a backend: one module in bench/backends/ (found by its module name, helpers there start with an underscore)
and a conf/bench/<name>.yaml with `backend: <name>`. A backend outside quantbench (a module of your own package, or
a file on PYTHONPATH) is registered by naming its import path in the environment variable QUANTBENCH_BACKENDS
(comma-separated, e.g. `QUANTBENCH_BACKENDS=mypackage.echo_backend`), set wherever `run.py` and its jobs run: it is
read when the config schema is built, before Hydra composes the config, so that its knobs are typed like the others.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from dataclasses import fields
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench.job.bench import roofline
from quantbench.job.bench.backends.base import Backend
from quantbench.job.bench.speed import (
    BenchPlan,
    BenchResult,
    decode_tokens_per_s,
    speed_metrics,
    stream_label,
    summarize,
)
from quantbench.errors import ConfigError

__all__ = [
    "BenchPlan",
    "BenchResult",
    "backend_names",
    "registry",
    "check_serving",
    "decode_tokens_per_s",
    "load_backend",
    "loads_from_disk",
    "plan",
    "run",
    "speed_metrics",
    "stream_label",
    "summarize",
]

log = logging.getLogger(__name__)

PLUGINS_ENV = "QUANTBENCH_BACKENDS"  # import paths of backend modules outside quantbench, comma-separated


@cache
def registry() -> dict[str, Backend]:
    """Every backend by name (`bench.backend=<name>`): each module of bench/backends/ (helpers there start with an
    underscore) and each module named in QUANTBENCH_BACKENDS; the `BACKEND` each defines."""
    here = Path(__file__).parent / "backends"
    modules = [f"quantbench.job.bench.backends.{m.name}" for m in pkgutil.iter_modules([str(here)])]
    modules = [m for m in modules if m.rsplit(".", 1)[1][0] != "_" and not m.endswith(".base")]
    modules += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    found: dict[str, Backend] = {}
    for module in modules:
        backend = getattr(importlib.import_module(module), "BACKEND", None)
        if backend is None or not backend.name:
            raise ConfigError(f"{module} defines no BACKEND with a name (see quantbench/job/bench/backends/base.py).")
        if backend.name in found or backend.name == "none":
            raise ConfigError(f"{module}: the backend name {backend.name!r} is taken (by another backend, or none).")
        found[backend.name] = backend
    return found


def backend_names() -> list[str]:
    return sorted(registry())


def load_backend(name: str) -> Backend:
    if name not in registry():
        raise ConfigError(
            f"bench.backend={name!r} is not a benchmark backend; choose one of {backend_names() + ['none']}."
        )
    return registry()[name]


def plan(cfg: DictConfig) -> BenchPlan | None:
    """Check every bench value before any model is loaded; None means no benchmark."""
    backend = str(cfg.backend)
    if backend == "none":
        return None
    load_backend(backend)  # a ConfigError for an unknown name
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
    result = BenchPlan(
        backend=backend,
        prompt_tokens=int(cfg.prompt_tokens),
        output_tokens=int(cfg.output_tokens),
        streams=[int(s) for s in streams],
        warmup=int(cfg.warmup),
        repeats=int(cfg.repeats),
    )
    # every backend's knobs, not only the chosen one's: vLLM falls back to hf's, and a sweep over bench.backend
    # should fail before its first job
    for name, each in registry().items():
        knobs = _read_knobs(each.Knobs, cfg.get(name) or {}, name, problems)
        if knobs is not None:
            result.knobs[name] = knobs
            problems += each.knob_problems(knobs, result)
    if problems:
        raise ConfigError("Nonsensical benchmark settings: " + "; ".join(problems) + ".")
    return result


def _read_knobs(knob_type: type, cfg, name: str, problems: list[str]):
    """`bench.<name>` as a `knob_type` dataclass; None, with the problem added, where it has unknown keys (Hydra's
    schema refuses those first; this catches a config made by hand)."""
    known = {f.name for f in fields(knob_type)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        problems.append(f"bench.{name} has unknown keys {unknown} (known: {sorted(known)})")
        return None
    return knob_type(**{k: list(v) if OmegaConf.is_list(v) else v for k, v in cfg.items()})


def check_serving(
    plan: BenchPlan | None,
    hardware,
    zero_points: bool,
    serving_format: str | None = None,
    quantized_lm_head: bool = False,
) -> None:
    """The planned backend's refusals before any model is loaded (`Backend.check`), for a method whose weights have
    a zero point per group (`zero_points`), in a format with device needs (`serving_format`), with its LM head
    quantized or not."""
    if plan is not None:
        load_backend(plan.backend).check(plan, hardware, zero_points, serving_format, quantized_lm_head)


def loads_from_disk(plan: BenchPlan) -> bool:
    """True for backends that serve the saved folder themselves (vLLM), so the in-memory model may be freed."""
    return bool(load_backend(plan.backend).loads_from_disk)


def run(plan: BenchPlan, model, tokenizer, model_dir: Path, hardware: DictConfig) -> BenchResult:
    """Benchmark with the planned backend (the in-memory model for hf, the saved folder for vllm), then set each
    stream count's median decode-only speed against the memory-bandwidth roofline of the bytes that backend reads
    per step on this hardware (the end-to-end speed where there is no decode-only figure; tags say which)."""
    backend = load_backend(plan.backend)
    result = backend.run(plan, model, tokenizer, model_dir, hardware)
    if not backend.roofline:
        return result
    try:
        index, bytes_basis = roofline.bytes_read(model_dir, result, hardware)
        decode = roofline.decode_bytes(model_dir, index)
        extra, tags = roofline.metrics(
            decode, plan.prompt_tokens, plan.output_tokens, plan.streams, result.metrics, hardware
        )
    except (OSError, KeyError, ValueError) as exc:  # keep the measurement; say why there is no roofline
        log.warning("No roofline for %s: %s", model_dir, exc)
        result.tags["roofline_unavailable"] = str(exc)[:250]
        return result
    tags["roofline_bytes_basis"] = bytes_basis
    result.metrics.update(extra)
    result.tags.update(tags)
    result.detail["roofline"] = {"decode_bytes": vars(decode), **extra, **tags}
    log.info("Roofline bytes per decode step: %s", bytes_basis)
    for n in plan.streams:
        label = stream_label(n)
        if f"roofline_fraction_{label}" not in extra:
            continue
        e2e = result.metrics.get(f"tokens_per_s_{label}")
        decode_tps = result.metrics.get(f"decode_tokens_per_s_{label}")
        log.info(
            "%s: %s tokens/s end to end, %s decode-only; %s = %.1f%% of the %.1f tokens/s bandwidth roofline "
            "(%.1f GB/s, %s)",
            label,
            _tps(e2e),
            _tps(decode_tps),
            "end to end" if decode_tps is None else "decode-only",
            100 * extra[f"roofline_fraction_{label}"],
            extra[f"roofline_tokens_per_s_{label}"],
            extra["memory_bandwidth_gbs"],
            tags["memory_bandwidth_source"],
        )
    return result


def _tps(value: float | None) -> str:
    return "no" if value is None else f"{value:.1f}"
