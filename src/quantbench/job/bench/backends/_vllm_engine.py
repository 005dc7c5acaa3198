"""The vLLM side of bench/backends/vllm.py, run as `python -m quantbench.job.bench.backends._vllm_engine request.json result.json` (or
`--probe result.json`: what this vLLM can serve on this machine, see `vllm.capabilities`).

Why a child process: importing vLLM and starting its engine changes the importing process for good (os.environ,
LD_PRELOAD, a torch.distributed group, `torch.set_num_threads` replaced by a no-op, the engine's memory), and on
CPU its OpenMP threads must be configured before the process starts. The Hydra job, its multirun siblings and
pytest stay clean; this process starts with `upstream.vllm_cpu.engine_env`, measures, writes JSON and exits.

This is the only quantbench module that imports vllm.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from quantbench.upstream.humming_ops import register_humming_ops
from quantbench.upstream.ray_records import import_transformers_before_ray

log = logging.getLogger("quantbench.job.bench.vllm_engine")
# At import, so that vLLM's engine core (forked or spawned from this module) has them too.
import_transformers_before_ray()
register_humming_ops()  # where humming-kernels is installed (the CUDA lock): vLLM's compile cache can then load


def describe_linear_layers(model) -> dict[str, int]:
    """'<quant method class>[/<scheme>]: <kernel>' -> count, for every vLLM linear layer of the loaded model and a
    quantized LM head.

    The kernel is the object vLLM chose at load time: a `...Kernel` instance held by the quant method or its
    scheme (mixed-precision, scaled-mm, FP4/FP8 kernels; compressed-tensors keeps the scheme on the layer), or by a
    method they wrap (INC's scheme serves AutoRound's GPTQ-packed layers through a GPTQ method), else
    the CPU GEMM bound to the layer (`layer.cpu_linear`: oneDNN, sgl-kernel or the torch fallback), else the quant
    method's GEMM function.
    """
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    kinds: Counter[str] = Counter()
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        # the LM head is an embedding to vLLM: listed (as "lm_head ...") only where a quantization method serves it
        head = isinstance(module, ParallelLMHead) and "Unquantized" not in type(method).__name__
        if not (isinstance(module, LinearBase) or head):
            continue
        scheme = getattr(method, "scheme", None) or getattr(module, "scheme", None)  # compressed-tensors: on the layer
        label = ("lm_head " if head else "") + type(method).__name__
        label += f"/{type(scheme).__name__}" if scheme is not None else ""
        kinds[f"{label}: {kernel_name(module, method, scheme)}"] += 1
    return dict(kinds)


def kernel_name(layer, method, scheme) -> str:
    """The class of the kernel object that serves `layer`, else its CPU GEMM, else its method's GEMM function."""
    owners = [method, scheme]
    for _ in range(3):  # and the methods these wrap: INC's scheme serves GPTQ-packed layers through a GPTQ method
        inner = []
        for owner in owners:
            for value in getattr(owner, "__dict__", {}).values():
                name = type(value).__name__
                if "Kernel" in name and not isinstance(value, type):
                    return name
                if name.endswith(("LinearMethod", "Scheme")):
                    inner.append(value)
        owners = inner
    cpu_linear = getattr(layer, "cpu_linear", None)
    if cpu_linear is not None:
        code = getattr(cpu_linear, "__code__", None)  # a lambda around the chosen op, e.g. ops.onednn_mm(...)
        return "cpu:" + (
            code.co_names[-1] if code is not None and code.co_names else getattr(cpu_linear, "__name__", "?")
        )
    gemm = getattr(method, "_gemm_impl", None)
    # no kernel object (e.g. BitsAndBytesLinearMethod calls bitsandbytes' own matmul from its apply())
    return getattr(gemm, "__name__", "its own apply()")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def backend_family(backend: str) -> list[str] | None:
    """The kernel classes vLLM counts as `--linear-backend=<backend>`; None where this vLLM has no such map. Where a
    family has no kernel for a layer, vLLM 0.32 falls back to its own choice with only a warning (0.26 refuses to
    start), so the parent checks what ran against this list."""
    try:
        from vllm.model_executor.kernels.linear import _LINEAR_BACKEND_KERNEL_MAP
    except ImportError:
        return None
    return sorted(k.__name__ for k in _LINEAR_BACKEND_KERNEL_MAP.get(backend, ()))


@contextmanager
def sampled_stacks(interval_s: float = 0.2, top: int = 40) -> Iterator[Counter[str]]:
    """Where this process's main thread spends a span, by sampling its stack every `interval_s` (a poor man's py-spy:
    no tracing, so what is timed runs at its own speed): each function on the stack is credited with the time since
    the previous sample, so a late wake-up under load still adds up to the span. On exit logs the functions with the
    most seconds, inclusive. QUANTBENCH_SAMPLE_ENGINE_START=1 samples the engine start with it (in-process engine
    core: vLLM's warm-up runs in this thread)."""
    main = threading.main_thread().ident
    inclusive: Counter[str] = Counter()
    stop = threading.Event()

    def sample() -> None:
        last = time.perf_counter()
        while not stop.wait(interval_s):
            frame, seen = sys._current_frames().get(main), set()
            while frame is not None:
                code = frame.f_code
                seen.add(f"{Path(code.co_filename).parent.name}/{Path(code.co_filename).name}:{code.co_name}")
                frame = frame.f_back
            now = time.perf_counter()
            for where in seen:
                inclusive[where] += now - last
            last = now

    sampler = threading.Thread(target=sample, name="start-sampler", daemon=True)
    sampler.start()
    try:
        yield inclusive
    finally:
        stop.set()
        sampler.join()
        for where, seconds in inclusive.most_common(top):
            log.info("start sampled: %6.1f s in %s", seconds, where)


def measure(request: dict) -> dict:
    """Start one engine on the saved model, then time every stream count of the plan."""
    from quantbench.upstream.vllm_cpu import installed_vllm

    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = sampled_stacks() if os.environ.get("QUANTBENCH_SAMPLE_ENGINE_START") == "1" else nullcontext()
    with sampling:
        llm = LLM(model=request["model_dir"], **request["engine"])
    engine_start_s = time.perf_counter() - started
    # where this process's Triton kernels are cached: engine_env's folder on CUDA unless set otherwise (workaround 6 of
    # upstream/vllm_cpu.py), else whatever torch set during the start
    log.info("vLLM engine ready in %.1f s (TRITON_CACHE_DIR %s)", engine_start_s, os.environ.get("TRITON_CACHE_DIR"))

    quant_method = llm.llm_engine.model_config.quantization or "none"
    try:
        linear_kernels = llm.apply_model(describe_linear_layers)[0]
        kernel_source = "model"
    except Exception as exc:  # noqa: BLE001 - the tag says where the answer came from
        log.warning("Could not walk vLLM's model for its linear kernels: %s", exc)
        linear_kernels, kernel_source = {}, f"unavailable: {exc}"

    new_tokens = int(request["output_tokens"])
    greedy = dict(temperature=0.0, ignore_eos=True)  # no per-request seed: it would force the slower seeded sampler

    def generate(prompts: list, tokens: int) -> float:
        # ignore_eos already makes max_tokens exact (checked below); min_tokens would add a logits processor per step
        params = SamplingParams(max_tokens=tokens, **greedy)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        produced = sorted({len(o.outputs[0].token_ids) for o in outputs})
        prompt_lens = sorted({len(o.prompt_token_ids) for o in outputs})
        if len(outputs) != len(prompts) or produced != [tokens] or prompt_lens != [request["prompt_tokens"]]:
            raise RuntimeError(
                f"vLLM produced {produced} tokens for prompts of {prompt_lens} tokens; expected exactly "
                f"{tokens} for {len(prompts)} prompts of {request['prompt_tokens']}"
            )
        return elapsed

    runs = []
    for n in request["streams"]:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"][str(n)]]
        for _ in range(request["warmup"]):
            generate(prompts, new_tokens)
        seconds = [generate(prompts, new_tokens) for _ in range(request["repeats"])]
        ttft = [generate(prompts, 1) for _ in range(request["repeats"])]
        tps = [n * new_tokens / s for s in seconds]
        runs.append({"streams": n, "seconds": seconds, "tokens_per_s": tps, "ttft_s": ttft})
        log.info("vLLM, %d stream(s): %s output tokens/s", n, ", ".join(f"{t:.1f}" for t in tps))

    dist = installed_vllm()
    backend = request["engine"].get("linear_backend")
    return {
        "linear_backend_family": backend_family(backend) if backend else None,
        "vllm_distribution": dist[0] if dist else "?",
        "vllm_version": dist[1] if dist else "?",
        "engine_start_s": engine_start_s,
        "quant_method": quant_method,
        "linear_kernels": linear_kernels,
        "kernel_source": kernel_source,
        "runs": runs,
        "peak_rss_gb": _peak_rss_gb(),
    }


FORCEABLE_ISAS = {  # QUANTBENCH_VLLM_CPU_ISA value -> torch.cpu feature checks answered False
    "avx2": (
        "_is_avx512_supported",
        "_is_avx512_bf16_supported",
        "_is_avx512_vnni_supported",
        "_is_amx_tile_supported",
        "_is_amx_fp16_supported",
    ),
    "avx512": ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"),
}


def force_cpu_isa() -> None:
    """QUANTBENCH_VLLM_CPU_ISA=avx2 (or avx512: AVX-512 without BF16/AMX) makes this process's vLLM load the kernel
    library of such a CPU on a more capable one.

    vLLM's CPU platform picks `_C` / `_C_AVX512` / `_C_AVX2` from torch.cpu's feature checks when it imports its
    kernels; answering them as that CPU would makes vLLM take that CPU's path, so tests and benchmarks can take each
    path on any machine. Only this child process is changed (oneDNN is held to the same ISA by `engine_env`).
    """
    isa = os.environ.get("QUANTBENCH_VLLM_CPU_ISA", "").lower()
    if not isa:
        return
    if isa not in FORCEABLE_ISAS:
        raise SystemExit(f"QUANTBENCH_VLLM_CPU_ISA={isa!r}: choose one of {sorted(FORCEABLE_ISAS)} or leave it unset")
    import torch

    for check in FORCEABLE_ISAS[isa]:
        if hasattr(torch.cpu, check):
            setattr(torch.cpu, check, lambda: False)
    log.info(
        "QUANTBENCH_VLLM_CPU_ISA=%s: torch.cpu reports no %s to vLLM in this process",
        isa,
        ", ".join(c.removeprefix("_is_").removesuffix("_supported") for c in FORCEABLE_ISAS[isa]),
    )


def probe() -> dict:
    """What this vLLM can serve here: its quantization methods, whether it serves a quantized LM head, and, on CPU,
    the kernel library it loaded, whether that library has the W4A16 GEMM (`cpu_gemm_wna16`) that 4-bit integer
    formats need, the GEMMs it has for the FP8, INT8 and NVFP4 formats, and whether it stores an FP8 KV cache."""
    import torch

    from quantbench.upstream.vllm_cpu import installed_vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    dist = installed_vllm()
    out: dict = {
        "vllm": f"{dist[0]}=={dist[1]}" if dist else "?",
        "quantization_methods": sorted(QUANTIZATION_METHODS),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if out["device"] == "cpu":
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        out["cpu"] = {
            "kernel_library": _loaded_kernel_library(),
            "cpu_gemm_wna16": hasattr(torch.ops._C, "cpu_gemm_wna16"),
            "onednn_mm": hasattr(torch.ops._C, "onednn_mm"),
            "avx512": bool(torch.cpu._is_avx512_supported()),
            "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "format_kernels": format_kernels(),
            "fp8_kv_cache": fp8_kv_cache_on_cpu(),
        }
    out["quantized_lm_head"] = quantized_lm_head()
    return out


# The kernel tables vLLM picks the GEMM of each activation / float format from (vllm.model_executor.kernels.linear),
# by the format names that methods declare (Method.serving_format).
FORMAT_KERNEL_TABLES = {
    "fp8_w8a8": "_POSSIBLE_FP8_KERNELS",
    "int8_w8a8": "_POSSIBLE_INT8_KERNELS",
    "nvfp4_a16": "_POSSIBLE_NVFP4_KERNELS",
}


def format_kernels() -> dict[str, list[str]]:
    """For each format, the kernels of vLLM's table for this platform that say they run on this machine
    (`is_supported()`): an empty list means vLLM has no GEMM for that format here and refuses to load it."""
    from vllm.model_executor.kernels import linear
    from vllm.platforms import current_platform

    found = {}
    for fmt, table in FORMAT_KERNEL_TABLES.items():
        kernels = getattr(linear, table, {}).get(current_platform._enum, [])
        found[fmt] = [k.__name__ for k in kernels if _supported(k)]
    return found


def _supported(kernel) -> bool:
    try:
        return bool(kernel.is_supported()[0])
    except Exception as exc:  # noqa: BLE001 - a kernel whose check fails here does not run here
        log.info("%s.is_supported() failed: %s", kernel.__name__, exc)
        return False


def fp8_kv_cache_on_cpu() -> bool:
    """vLLM's CPU attention stores an FP8 KV cache where its backend lists fp8 and the CPU has AVX-512 or AMX (the
    backend's own condition; it also needs a head size divisible by 32, which the engine checks per model)."""
    import torch

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return False
    listed = "fp8" in getattr(CPUAttentionBackend, "supported_kv_cache_dtypes", [])
    return listed and bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def quantized_lm_head() -> bool:
    """Whether vLLM's compressed-tensors loader gives a quantized ParallelLMHead its scheme (else it loads the head
    as an unquantized embedding and fails on the quantized tensors). It matches the head by layer name, which the
    methods therefore list in their targets (methods/_preset.py `targets`)."""
    import inspect

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    return "ParallelLMHead" in inspect.getsource(CompressedTensorsConfig.get_quant_method)


def _loaded_kernel_library() -> str | None:
    """Which of vLLM's CPU kernel libraries (_C, _C_AVX512, _C_AVX2) this process has mapped. Read from the loader's
    map, not sys.modules: vLLM imports _C_AVX2/_C_AVX512 under the module name _C, so the import raises and is
    ignored while the library stays loaded."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = {m.group(1) for m in re.finditer(r"/vllm/(_C(?:_AVX512|_AVX2)?)\.[\w.]*so", maps)}
    return ",".join(sorted(found)) or None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    force_cpu_isa()
    if argv and argv[0] == "--probe":  # read by other jobs too: written whole, never seen half-written
        from quantbench import atomic

        atomic.write_text(Path(argv[1]), json.dumps(probe(), indent=1))
        return 0
    request_path, result_path = Path(argv[0]), Path(argv[1])
    result = measure(json.loads(request_path.read_text()))
    result_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
