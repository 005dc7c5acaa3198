"""The pipeline on a CUDA GPU (`pytest -m gpu`; skipped where no CUDA device is visible, so CI never runs them).

Every method through `python run.py` on the embedded model with a GPU hardware config (accuracy means something
there), and one artifact served by vLLM's CUDA build. Run on the lent H100/H200 test machine; its log is committed
under benchmarks/results/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from helpers.run_if import run_if

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    run_if(cuda=True),
]

# Per-method overrides for the GPU test machine: it has no network, and GPTQModel's default kernel on Hopper (Machete)
# is built on first use against a CUTLASS release it downloads, which fails offline; auto-round's 200
# iterations do not separate anything on the embedded model (conf/method/autoround_sym.yaml), 20 keep the test short.
METHODS = {
    "fp16": [],
    "bnb_nf4": [],
    "awq": [],
    "gptq": ["method.backend=marlin"],
    "autoround_sym": ["method.iters=20"],
    "aqlm_2bit": [],
}


def gpu_hardware() -> str:
    """The hardware config of the visible GPU (its datasheet bandwidth is the roofline)."""
    name = torch.cuda.get_device_name(0)
    return next((hw for hw in ("h200", "h100", "a100", "rtx4090") if hw in name.lower().replace(" ", "")), "h100")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_runs")


@pytest.fixture(scope="module")
def fp16_run(tiny_root, store_dir):
    return _run("fp16", store_dir)


def _run(method: str, work):
    """One job through `python run.py` on the GPU, into a store shared by this module's tests."""
    (work / method).mkdir(exist_ok=True)
    store = run_cli(
        f"method={method}",
        *METHODS[method],
        f"hardware={gpu_hardware()}",
        "eval=tiny",
        "bench=smoke",
        mlruns=work / "mlruns",
        workdir=work / method,
        check=False,
        timeout=1200,
    )
    keep_log(method, store)
    runs = [r for r in store.runs() if r.data.tags["method"] == method]
    assert runs, store.result.stdout[-4000:]
    return runs[-1], store


def keep_log(name: str, store) -> None:
    """The job's whole output (timestamped log lines) into $QB_GPU_LOGS/<name>.log where that is set: the device
    command sets it to its $OUT, so each job's log comes back to be committed beside the pytest log."""
    if folder := os.environ.get("QB_GPU_LOGS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.log").write_text(store.result.stdout)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_finishes_the_pipeline_on_cuda(tiny_root, store_dir, fp16_run, method):
    """Quantized on the GPU, verified in a fresh process, scored by lm-eval on CUDA and benchmarked; the embedded
    model keeps its facts: 4-bit within 5 points of fp16, 2-bit within 15."""
    run, store = fp16_run if method == "fp16" else _run(method, store_dir)
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason", store.result.stdout[-4000:])
    assert run.data.tags["artifact_verified"] == "true"
    assert run.data.params["hardware.device"] == "cuda"
    assert run.data.metrics["quantize_peak_mem_gb"] > 0  # CUDA's allocator saw the model
    assert run.data.metrics["tokens_per_s_1_stream"] > 0
    fp16 = fp16_run[0].data.metrics["tiny_facts_acc"]
    assert fp16 >= 0.8
    assert run.data.metrics["tiny_facts_acc"] >= fp16 - (0.15 if method.startswith("aqlm") else 0.05)


def test_vllm_serves_an_awq_artifact_on_cuda_with_the_kernel_family_asked_for(tiny_root, tmp_path):
    """Marlin, named through vLLM's --linear-backend (bench.vllm.linear_backend): on Hopper vLLM would pick Machete.
    AWQ (llm-compressor, compressed-tensors) rather than GPTQ: GPTQModel JIT-compiles its CUDA extensions (~6 minutes
    on a fresh H100) when a GPTQ folder is first loaded, which left this test no time inside one 10-minute command;
    the GPTQ pipeline on CUDA is the test above's."""
    store = run_cli(
        "method=awq",
        *METHODS["awq"],
        f"hardware={gpu_hardware()}",
        "eval=none",
        "bench=smoke",
        "bench.backend=vllm",
        "bench.vllm.linear_backend=marlin",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
        timeout=1200,
        check=False,
    )
    keep_log("vllm-awq", store)
    assert store.result.returncode == 0, store.result.stdout[-4000:]
    (run,) = store.runs()
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["bench_backend"] == "vllm"
    assert "MarlinLinearKernel" in tags["vllm_linear_kernel"] and tags["vllm_linear_backend"] == "marlin", tags
    assert 0 < metrics["serve_mem_gb"] < 80  # the engine's device memory, read while it ran
    assert metrics["roofline_fraction_1_stream"] < 1.0


def test_the_bandwidth_measured_on_the_gpu_is_the_cards_own_and_below_its_datasheet():
    """hardware.memory_bandwidth_gbs=null on a GPU measures the card's memory: well above any host's, and under the
    datasheet figure (a copy timed without waiting for the GPU would read far above it)."""
    from omegaconf import OmegaConf

    from quantbench.job.bench import roofline

    datasheet = OmegaConf.load(Path(__file__).parents[2] / "conf" / "hardware" / f"{gpu_hardware()}.yaml")
    measured = roofline.measure_bandwidth_gbs(device="cuda")
    assert 0.5 * datasheet.memory_bandwidth_gbs < measured < 1.02 * datasheet.memory_bandwidth_gbs


def test_serving_on_cuda_logs_nvml_energy_consistent_with_power_and_time(tiny_root, tmp_path):
    """bench=serving on the GPU: vLLM's server under `vllm bench serve` at 1 and 4 users, with NVML's energy over each
    point's window: joules per output token > 0, and energy = average power x the window (the same counter read
    twice; the window is the generator's, within its own duration)."""
    store = run_cli(
        "method=fp16",
        f"hardware={gpu_hardware()}",
        "eval=none",
        "quality=none",
        "bench=serving",
        "bench.streams=[1,4]",
        "bench.serving.prompts_per_user=8",
        "hardware.cost_per_hour=2.5",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
        timeout=1200,
        check=False,
    )
    keep_log("serving-fp16", store)
    assert store.result.returncode == 0, store.result.stdout[-4000:]
    (run,) = store.runs()
    tags, metrics, client = run.data.tags, run.data.metrics, store.client
    assert "energy_unavailable" not in tags, tags.get("energy_unavailable")
    assert tags["energy_source"].startswith("NVML")
    history = {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"serve_{name}")}
        for name in ("energy_j", "avg_power_w", "joules_per_output_token", "duration_s", "output_tokens_per_s")
    }
    for c in (1, 4):
        assert history["joules_per_output_token"][c] > 0
        assert 30 < history["avg_power_w"][c] < 1500  # a GPU's plausible range, idle to beyond an H200's TDP
        # energy / (power x window) is 1 by construction; the window is the generator's own duration within 10%
        window = history["energy_j"][c] / history["avg_power_w"][c]
        assert window == pytest.approx(history["duration_s"][c], rel=0.1)
        tokens = history["output_tokens_per_s"][c] * history["duration_s"][c]
        assert history["joules_per_output_token"][c] == pytest.approx(history["energy_j"][c] / tokens, rel=0.1)
    assert 0 < metrics["serve_mem_gb"] < 200 and tags["mem_basis.serve_mem_gb"] == "cuda_device_used"
