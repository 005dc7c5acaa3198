"""Where a one-stream decode step's time goes, kernel by kernel, on a GPU: the saved folder served by vLLM as the
benchmark serves it (CUDA graphs, torch.compile), 100 prompt + 250 generated tokens, under torch's profiler (CUPTI
sees the kernels inside the CUDA graphs).

    python benchmarks/gpu/decode_profile.py FOLDER [--dtype float16] [--linear-backend humming] [--out profile.json]

Prints per kernel family the GPU time per generated token and its share of the step, and the step's wall time: what
the kernels do not cover is launch gaps and host work. The weight GEMMs' time beside the bytes they read gives their
achieved bandwidth. Why by hand: vLLM's own profiler hook writes a trace for a viewer, not a table per token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("decode_profile")
FAMILIES = [  # kernel name pattern -> family (first match wins)
    (r"humming|marlin|machete|gemm_wna16|wna16|gptq|awq|exllama|fp4|nvfp4", "quantized GEMM"),
    (r"flash|fmha|attn|attention|paged", "attention"),
    (r"cutlass|gemm|gemv|sm90_xmma|sm80_xmma|cublas|nvjet|splitK", "dense GEMM"),
    (r"rms|norm", "norm"),
    (r"rotary|rope", "rotary"),
    (r"silu|act_and_mul|gelu", "activation"),
    (r"sample|topk|top_k|argmax|softmax|sort|gumbel|exponential", "sampling"),
    (r"triton", "other Triton (fused by torch.compile)"),
]


def family(name: str) -> str:
    return next((f for pattern, f in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--linear-backend", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from quantbench.upstream.humming_ops import register_humming_ops
    from quantbench.upstream.vllm_cpu import engine_env

    os.environ.update(engine_env("cuda"))  # the benchmark's: its compile cache, the FlashInfer sampler setting
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the profiler is
    register_humming_ops()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(dtype=args.dtype, max_model_len=350, max_num_seqs=1, enable_prefix_caching=False, seed=0)
    engine |= dict(cudagraph_capture_sizes=[1], kv_cache_memory_bytes=2**30)
    if args.linear_backend:
        engine["linear_backend"] = args.linear_backend
    llm = LLM(model=str(args.folder), **engine)
    prompt = [TokensPrompt(prompt_token_ids=list(range(1000, 1100)))]
    params = SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    started = time.perf_counter()  # timed without the profiler, which slows the host side
    llm.generate(prompt, params, use_tqdm=False)
    wall = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if gpu_us and event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.key] += gpu_us
    tokens = 250
    step_ms = wall / tokens * 1e3
    families: dict[str, float] = defaultdict(float)
    for name, us in per_kernel.items():
        families[family(name)] += us / tokens / 1e3
    busy = sum(families.values())
    log.info(
        "%s: %.3f ms per generated token end to end (%.1f tokens/s, prefill included)",
        args.folder,
        step_ms,
        1e3 / step_ms,
    )
    log.info("%-40s %10s %8s", "kernel family", "ms/token", "share")
    for name, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        log.info("%-40s %10.3f %7.1f%%", name, ms, 100 * ms / step_ms)
    log.info(
        "%-40s %10.3f %7.1f%%", "GPU idle (launch gaps, host work)", step_ms - busy, 100 * (step_ms - busy) / step_ms
    )
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    log.info("top kernels (ms per token):")
    for name, us in top:
        log.info("  %8.4f  %s", us / tokens / 1e3, name[:140])
    if args.out:
        args.out.write_text(
            json.dumps({"step_ms": step_ms, "families_ms": families, "top_kernels_us": dict(top)}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
