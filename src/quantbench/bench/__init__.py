"""Throughput benchmarks. One module per backend (`hf`, `vllm`), chosen by `bench.backend`.

A backend module exposes `run(plan, model, tokenizer, model_dir, hardware) -> BenchResult`, turning its timings into
metrics with `speed_metrics` (end-to-end and decode-only tokens/s, TTFT: one formula for every backend). `run()`
here adds the memory-bandwidth roofline (bench/roofline.py) to whatever the backend measured, so every backend
reports it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class VllmKnobs:
    """`bench.vllm` (all optional): how the vLLM backend sizes its engine."""

    kv_cache_gb: float | None = 1.0  # explicit KV cache (GiB); null: vLLM's memory-utilisation default
    enforce_eager: bool = False  # skip torch.compile (faster start, slower decode)
    max_model_len: int | None = None  # null: prompt_tokens + output_tokens, all the benchmark needs
    cpu_threads: int | None = None  # OpenMP threads of the CPU engine; null: usable cores - 1 (at least 1)
    # vLLM linear kernels to rule out (VLLM_DISABLED_KERNELS), e.g. [MacheteLinearKernel] to serve GPTQ/AWQ with
    # Marlin on Hopper; a run fails if a disabled kernel still ran.
    disabled_kernels: list[str] = field(default_factory=list)
    # The engine process (start, warm-up, every timed run) is killed with its children after this long; null: no limit.
    timeout_s: float | None = 1800.0


@dataclass
class HfKnobs:
    """`bench.hf` (all optional): how the transformers backend decodes."""

    cache: str = "static"  # "static": KV cache allocated once (what transformers compiles); "dynamic": grown per token
    compile: str = "auto"  # "auto": transformers' own rule (CUDA/XPU, static cache, compileable quantizer); "never"

    CACHES = ("static", "dynamic")
    COMPILES = ("auto", "never")


@dataclass
class BenchPlan:
    backend: str
    prompt_tokens: int
    output_tokens: int
    streams: list[int]
    warmup: int
    repeats: int
    vllm: VllmKnobs = field(default_factory=VllmKnobs)
    hf: HfKnobs = field(default_factory=HfKnobs)


@dataclass
class BenchResult:
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)  # every timing, for the benchmark JSON artifact
    # The tensors the backend held in memory while it decoded (name -> (dtype, shape, bytes)), where it ran an
    # in-memory model: the roofline counts these rather than the stored ones (a decompressed format reads more).
    loaded: dict[str, tuple[str, list[int], int]] | None = None


def backends() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_") and m.name not in ("roofline",)
    )


def plan(cfg: DictConfig) -> BenchPlan | None:
    """Check every bench value before any model is loaded; None means no benchmark."""
    backend = str(cfg.backend)
    if backend == "none":
        return None
    if backend not in backends():
        raise ConfigError(
            f"bench.backend={backend!r} is not a benchmark backend; choose one of {backends() + ['none']}."
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
    if knobs.timeout_s is not None and float(knobs.timeout_s) <= 0:
        problems.append(f"bench.vllm.timeout_s={knobs.timeout_s} (must be > 0, or null)")
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


def load_backend(name: str):
    return importlib.import_module(f"quantbench.bench.{name}")


def loads_from_disk(plan: BenchPlan) -> bool:
    """True for backends that serve the saved folder themselves (vLLM), so the in-memory model may be freed."""
    return bool(getattr(load_backend(plan.backend), "LOADS_FROM_DISK", False))


def run(plan: BenchPlan, model, tokenizer, model_dir: Path, hardware: DictConfig) -> BenchResult:
    """Benchmark with the planned backend (the in-memory model for hf, the saved folder for vllm), then set each
    stream count's median decode-only speed against the memory-bandwidth roofline of the bytes that backend reads
    per step on this hardware (the end-to-end speed where there is no decode-only figure; tags say which)."""
    from quantbench.bench import roofline

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


def stream_label(n: int) -> str:
    return f"{n}_stream" if n == 1 else f"{n}_streams"


def summarize(prefix: str, n_streams: int, values: list[float]) -> dict[str, float]:
    """median, min and max of repeated measurements, named `<prefix>_<n>_stream(s)[_min|_max]`."""
    label = f"{prefix}_{stream_label(n_streams)}"
    return {label: statistics.median(values), f"{label}_min": min(values), f"{label}_max": max(values)}


def decode_tokens_per_s(
    n_streams: int, output_tokens: int, seconds: list[float], ttft: list[float]
) -> tuple[list[float | None], str | None]:
    """Decode-only tokens/s of each repeat: the output tokens after the first, n * (output_tokens - 1), over the
    time after the first token, the repeat's full generation less the time to first token of its paired TTFT run.

    End-to-end tokens/s also pays for the prefill; decoding alone is what the bandwidth roofline bounds. A repeat
    whose generation took no longer than its first token, or a plan of one output token, has no decode time to divide
    by: its value is None and the second element says why (None when every repeat has a figure).
    """
    if output_tokens == 1:
        return [None] * len(seconds), "output_tokens=1: no token is decoded after the first"
    values: list[float | None] = []
    short = []
    for i, (total, first) in enumerate(zip(seconds, ttft, strict=True)):
        if total <= first:
            values.append(None)
            short.append(f"repeat {i + 1}: {total:.4g} s in all, {first:.4g} s to the first token")
        else:
            values.append(n_streams * (output_tokens - 1) / (total - first))
    if short:
        return values, "the generation took no longer than its first token (" + "; ".join(short) + ")"
    return values, None


def speed_metrics(runs: list[dict], output_tokens: int) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and tags from each stream count's timed repeats (dicts with `streams`, `seconds`, `ttft_s`), the same
    for every backend: `tokens_per_s_<label>` end to end (output tokens over the whole generation, what
    `vllm bench throughput` reports), `decode_tokens_per_s_<label>` (see `decode_tokens_per_s`) and `ttft_s_<label>`,
    each as median, min and max.

    Adds the per-repeat `tokens_per_s` and `decode_tokens_per_s` to each run (for the benchmark JSON). A stream count
    where any repeat has no decode figure gets no decode metric (a median of the rest would be biased); the tag
    `decode_tokens_per_s_unavailable` says why.
    """
    metrics: dict[str, float] = {}
    missing = []
    for run in runs:
        n = int(run["streams"])
        run["tokens_per_s"] = [n * output_tokens / s for s in run["seconds"]]
        run["decode_tokens_per_s"], why = decode_tokens_per_s(n, output_tokens, run["seconds"], run["ttft_s"])
        metrics.update(summarize("tokens_per_s", n, run["tokens_per_s"]))
        if why is None:
            metrics.update(summarize("decode_tokens_per_s", n, run["decode_tokens_per_s"]))
        else:
            run["decode_unavailable"] = why
            missing.append(f"{stream_label(n)}: {why}")
            log.warning("No decode-only tokens/s at %s: %s", stream_label(n), why)
        metrics.update(summarize("ttft_s", n, run["ttft_s"]))
    tags = {"decode_tokens_per_s_unavailable": "; ".join(missing)[:500]} if missing else {}
    return metrics, tags
