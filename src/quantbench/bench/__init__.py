"""Throughput benchmarks. One module per backend in `bench/backends/` (`hf`, `vllm`), chosen by
`bench.backend`; what they share (plan, result, speed formula) is in `bench/speed.py`.

A backend module exposes `run(plan, model, tokenizer, model_dir, hardware) -> BenchResult`, turning its timings into
metrics with `speed_metrics` (end-to-end and decode-only tokens/s, TTFT: one formula for every backend). `run()`
here adds the memory-bandwidth roofline (bench/roofline.py) to whatever the backend measured, so every backend
reports it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench.bench import roofline
from quantbench.bench.speed import (
    BenchPlan,
    BenchResult,
    HfKnobs,
    VllmKnobs,
    decode_tokens_per_s,
    speed_metrics,
    stream_label,
    summarize,
)
from quantbench.errors import ConfigError

__all__ = [
    "BenchPlan",
    "BenchResult",
    "HfKnobs",
    "VllmKnobs",
    "backend_names",
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


def backend_names() -> list[str]:
    """Every module of bench/backends/ (helpers there start with an underscore)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "backends")]) if m.name[0] != "_")


def plan(cfg: DictConfig) -> BenchPlan | None:
    """Check every bench value before any model is loaded; None means no benchmark."""
    backend = str(cfg.backend)
    if backend == "none":
        return None
    if backend not in backend_names():
        raise ConfigError(
            f"bench.backend={backend!r} is not a benchmark backend; choose one of {backend_names() + ['none']}."
        )
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
    knobs = _vllm_knobs(cfg.get("vllm") or {}, problems)
    hf_knobs = _hf_knobs(cfg.get("hf") or {}, problems)
    if knobs.max_model_len is not None and knobs.max_model_len < int(cfg.prompt_tokens) + int(cfg.output_tokens):
        problems.append(
            f"bench.vllm.max_model_len={knobs.max_model_len} (must hold prompt_tokens + output_tokens = "
            f"{int(cfg.prompt_tokens) + int(cfg.output_tokens)})"
        )
    if problems:
        raise ConfigError("Nonsensical benchmark settings: " + "; ".join(problems) + ".")
    return BenchPlan(
        backend=backend,
        prompt_tokens=int(cfg.prompt_tokens),
        output_tokens=int(cfg.output_tokens),
        streams=[int(s) for s in streams],
        warmup=int(cfg.warmup),
        repeats=int(cfg.repeats),
        vllm=knobs,
        hf=hf_knobs,
    )


def _read_knobs(knob_type, cfg, group: str, problems: list[str]):
    """`bench.<group>` as a `knob_type` dataclass; unknown keys are a problem (and leave the defaults)."""
    known = set(knob_type.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        problems.append(f"bench.{group} has unknown keys {unknown} (known: {sorted(known)})")
        return knob_type()
    return knob_type(**{k: list(v) if OmegaConf.is_list(v) else v for k, v in cfg.items()})


def _vllm_knobs(cfg, problems: list[str]) -> VllmKnobs:
    knobs = _read_knobs(VllmKnobs, cfg, "vllm", problems)
    if knobs.kv_cache_gb is not None and float(knobs.kv_cache_gb) <= 0:
        problems.append(f"bench.vllm.kv_cache_gb={knobs.kv_cache_gb} (must be > 0, or null)")
    if not isinstance(knobs.disabled_kernels, list) or not all(isinstance(k, str) for k in knobs.disabled_kernels):
        problems.append(f"bench.vllm.disabled_kernels={knobs.disabled_kernels!r} (a list of kernel class names)")
    if knobs.linear_backend not in VllmKnobs.LINEAR_BACKENDS:
        problems.append(
            f"bench.vllm.linear_backend={knobs.linear_backend!r} (one of {list(VllmKnobs.LINEAR_BACKENDS)})"
        )
    if knobs.dtype not in VllmKnobs.DTYPES:
        problems.append(f"bench.vllm.dtype={knobs.dtype!r} (one of {list(VllmKnobs.DTYPES)})")
    if knobs.timeout_s is not None and float(knobs.timeout_s) <= 0:
        problems.append(f"bench.vllm.timeout_s={knobs.timeout_s} (must be > 0, or null)")
    share = knobs.gpu_memory_utilization
    if share is not None and not 0 < float(share) <= 1:
        problems.append(f"bench.vllm.gpu_memory_utilization={share} (a share of the GPU's memory in (0, 1], or null)")
    if knobs.cpu_threads is not None and int(knobs.cpu_threads) < 1:
        problems.append(f"bench.vllm.cpu_threads={knobs.cpu_threads} (must be >= 1, or null)")
    return knobs


def _hf_knobs(cfg, problems: list[str]) -> HfKnobs:
    knobs = _read_knobs(HfKnobs, cfg, "hf", problems)
    if knobs.cache not in HfKnobs.CACHES:
        problems.append(f"bench.hf.cache={knobs.cache!r} (one of {list(HfKnobs.CACHES)})")
    if knobs.compile not in HfKnobs.COMPILES:
        problems.append(f"bench.hf.compile={knobs.compile!r} (one of {list(HfKnobs.COMPILES)})")
    return knobs


def check_serving(plan: BenchPlan | None, hardware, zero_points: bool) -> None:
    """What the asked-for kernels need of the serving dtype and of the method's weights (`zero_points`: stored with
    a zero point per group), checked before any model is loaded."""
    if plan is None or plan.backend != "vllm":
        return
    from quantbench.dtypes import torch_dtype  # here: loads torch, which a plan's check may not have yet

    knobs = plan.vllm
    dtype = str(torch_dtype(knobs.serving_dtype(str(hardware.dtype)))).removeprefix("torch.")  # half: float16
    allowed = VllmKnobs.BACKEND_DTYPES.get(knobs.linear_backend)
    if allowed and dtype not in allowed:
        raise ConfigError(
            f"bench.vllm.linear_backend={knobs.linear_backend} computes in {' or '.join(allowed)} only, but vLLM "
            f"would serve in {dtype} (bench.vllm.dtype={knobs.dtype}, hardware.dtype={hardware.dtype}); add "
            f"bench.vllm.dtype={allowed[0]} to serve the artifact in {allowed[0]} whatever it was quantized in."
        )
    if zero_points and knobs.linear_backend in VllmKnobs.SYMMETRIC_ONLY:
        raise ConfigError(
            f"bench.vllm.linear_backend={knobs.linear_backend} serves symmetric integer weights only, but this method "
            f"stores a zero point per group; quantize symmetrically (awq: method.zero_point=false; gptq: "
            f"method.sym=true; rtn: method.symmetric=true) or ask for another kernel family."
        )


def load_backend(name: str):
    return importlib.import_module(f"quantbench.bench.backends.{name}")


def loads_from_disk(plan: BenchPlan) -> bool:
    """True for backends that serve the saved folder themselves (vLLM), so the in-memory model may be freed."""
    return bool(getattr(load_backend(plan.backend), "LOADS_FROM_DISK", False))


def run(plan: BenchPlan, model, tokenizer, model_dir: Path, hardware: DictConfig) -> BenchResult:
    """Benchmark with the planned backend (the in-memory model for hf, the saved folder for vllm), then set each
    stream count's median decode-only speed against the memory-bandwidth roofline of the bytes that backend reads
    per step on this hardware (the end-to-end speed where there is no decode-only figure; tags say which)."""
    result = load_backend(plan.backend).run(plan, model, tokenizer, model_dir, hardware)
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
