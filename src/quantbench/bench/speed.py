"""What every benchmark backend shares: the plan it runs, the result it returns, and one formula that turns timed
repeats into end-to-end and decode-only tokens/s and time to first token."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

from quantbench.names import stream_label

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
    # vLLM's --linear-backend: the one family of quantized-linear kernels vLLM may choose from (marlin, machete,
    # triton, conch, exllama, humming, ...); "auto": vLLM's own choice. Where the family cannot serve a layer, vLLM
    # 0.26 refuses to start and 0.32 serves it with its own choice: either way the run fails and says why. A sweep
    # over it compares kernels for one artifact: bench.vllm.linear_backend=marlin,machete
    linear_backend: str = "auto"
    # The dtype vLLM computes in; "auto": hardware.dtype, the one the model was quantized and evaluated in. float16
    # serves a bfloat16-quantized artifact to kernels that take float16 activations only (Exllama), without
    # quantizing in float16 (which overflows on some models, e.g. llama-3.1-8b-shape's random weights under AWQ).
    dtype: str = "auto"
    # The engine process (start, warm-up, every timed run) is killed with its children after this long; null: no limit.
    timeout_s: float | None = 1800.0
    # The share of the GPU's memory the engine may take (vLLM's gpu_memory_utilization; with kv_cache_gb set it bounds
    # only vLLM's start-up check that this much is free). null: what is free when the engine starts, less 1 GiB, at
    # most 0.9. Set it when other jobs share the card: what is free moves while they load and free models.
    gpu_memory_utilization: float | None = None

    # KernelConfig.linear_backend's values in vLLM 0.26 and 0.32 (the releases quantbench runs on GPU and CPU)
    LINEAR_BACKENDS = (
        "auto", "cutlass", "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_trtllm", "flashinfer_cudnn",
        "flashinfer_b12x", "b12x", "marlin", "humming", "triton", "deep_gemm", "torch", "aiter", "machete", "fbgemm",
        "conch", "exllama", "emulation", "xpu", "xpu_woq",
    )  # fmt: skip
    DTYPES = ("auto", "float16", "bfloat16", "float32")
    # What a linear backend's kernels refuse, checked before any work (vLLM 0.26 and 0.32, ExllamaLinearKernel:
    # "Exllama only supports float16 activations", and SUPPORTED_QUANT_TYPES holds no type with a zero point).
    BACKEND_DTYPES = {"exllama": ("float16",)}
    SYMMETRIC_ONLY = ("exllama",)

    def serving_dtype(self, hardware_dtype: str) -> str:
        """The dtype vLLM computes in: `dtype`, or the hardware's where that is "auto"."""
        return hardware_dtype if self.dtype == "auto" else self.dtype


@dataclass
class HfKnobs:
    """`bench.hf` (all optional): how the transformers backend decodes. The first warm-up run decides the path (and
    compiles); the bench_path tag says which path ran."""

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
