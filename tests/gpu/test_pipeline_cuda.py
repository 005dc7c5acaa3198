"""The pipeline on a CUDA GPU (`pytest -m gpu`; skipped where no CUDA device is visible, so CI never runs them).

Every method through `python run.py -m` on the embedded model with a GPU hardware config (accuracy means something
there), and one artifact served by vLLM's CUDA build. Run on the lent H100/H200 test machine; its log is committed
under benchmarks/results/.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ["fp16", "bnb_nf4", "awq", "gptq", "autoround_sym", "aqlm_2bit"]


def gpu_hardware() -> str:
    """The hardware config of the visible GPU (its datasheet bandwidth is the roofline)."""
    name = torch.cuda.get_device_name(0)
    return next((hw for hw in ("h200", "h100", "a100", "rtx4090") if hw in name.lower().replace(" ", "")), "h100")


@pytest.fixture(scope="module")
def cuda_sweep(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda_sweep")
    return run_cli("-m", f"method={','.join(METHODS)}", f"hardware={gpu_hardware()}", "eval=tiny", "bench=smoke",
                   mlruns=work / "mlruns", workdir=work, check=False, timeout=3000)


@pytest.fixture(scope="module")
def cuda_runs(cuda_sweep):
    return {r.data.tags["method"]: r for r in cuda_sweep.runs()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finishes_the_pipeline_on_cuda(cuda_runs, cuda_sweep, method):
    run = cuda_runs.get(method)
    assert run is not None, cuda_sweep.result.stdout[-4000:]
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason", cuda_sweep.result.stdout[-4000:])
    assert run.data.tags["artifact_verified"] == "true"
    assert run.data.params["hardware.device"] == "cuda"
    assert run.data.metrics["tokens_per_s_1_stream"] > 0
    # quantized on the GPU: CUDA's allocator saw the model
    assert run.data.metrics["quantize_peak_mem_gb"] > 0


def test_accuracy_on_cuda_matches_what_the_cpu_gives(cuda_runs):
    """The embedded model knows its facts on CUDA too; 4-bit stays within 5 points of fp16, 2-bit within 15."""
    fp16 = cuda_runs["fp16"].data.metrics["tiny_facts_acc"]
    assert fp16 >= 0.8
    for method, run in cuda_runs.items():
        floor = fp16 - (0.15 if method.startswith("aqlm") else 0.05)
        assert run.data.metrics["tiny_facts_acc"] >= floor, method


def test_vllm_serves_a_gptq_artifact_on_cuda_with_a_named_gpu_kernel(tiny_root, tmp_path):
    store = run_cli("method=gptq", f"hardware={gpu_hardware()}", "eval=none", "bench=smoke", "bench.backend=vllm",
                    mlruns=tmp_path / "mlruns", workdir=tmp_path, timeout=1200)
    (run,) = store.runs()
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["bench_backend"] == "vllm"
    assert any(k in tags["vllm_linear_kernel"] for k in ("MacheteLinearKernel", "MarlinLinearKernel")), tags
    assert 0 < metrics["serve_mem_gb"] < 80  # the engine's device memory, read while it ran
    assert metrics["roofline_fraction_1_stream"] < 1.0
