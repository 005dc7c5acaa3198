"""The selection policy compares like with like: NaN passes no constraint, each metric ranks in the direction that
is better for it (or not at all), memory figures are held to one limit only where they measured the same thing, and
a policy value out of range is refused before any run is read."""

from __future__ import annotations

import math

import pytest
from helpers.synthetic_store import correctness, log_run, make_store

from quantbench import policy
from quantbench.errors import ConfigError
from quantbench.runs import Store

N = 400
GPU = {"host.gpu": "NVIDIA H100 80GB HBM3"}


def decide(uri: str, *overrides: str) -> dict:
    st = Store(uri)
    sel = st.select("quantbench-tiny")
    return {d.row.method: d for d in policy.decide(sel, st.compare(sel), policy.load_policy(list(overrides)))}


@pytest.fixture
def three(tmp_path):
    """fp16 and two 4-bit runs within noise of it, each with sizes, a fingerprint loss and quality figures."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    figures = {
        "fp16": {"bits_per_weight": 16.0, "fingerprint_nll": 2.00, "quality_kl_mean": 0.0},
        "gptq": {"bits_per_weight": 4.25, "fingerprint_nll": 2.10, "quality_kl_mean": math.nan},
        "awq": {"bits_per_weight": 4.50, "fingerprint_nll": 2.05, "quality_kl_mean": 0.002},
    }
    for i, (method, metrics) in enumerate(figures.items()):
        log_run(client, exp, method, job_num=i, samples={"t1": correctness(N, 300, i, i)}, metrics=metrics)
    return uri


def test_nan_never_passes_a_constraint(three):
    d = decide(three, "max_kl_mean=0.01", "tie_break=null")
    assert d["gptq"].rejected == ["quality_kl_mean is nan (not a measurement) to check against max 0.01"]
    assert not d["gptq"].won and d["awq"].rejected == []


@pytest.mark.parametrize("name, best", [("bits_per_weight", "gptq"), ("fingerprint_nll", "fp16")])
def test_sizes_and_losses_rank_smaller_first(three, name, best):
    d = decide(three, f"rank_by={name}", "tie_tolerance=0", "tie_break=null")
    assert [m for m, x in d.items() if x.won] == [best]
    assert d[best].why.startswith(f"best {name}")


@pytest.mark.parametrize("override", ["rank_by=t1_acc_stderr", "tie_break=t1_acc_stderr", "rank_by=quality_tokens"])
def test_a_metric_that_measures_the_measurement_ranks_nothing(override):
    with pytest.raises(ConfigError, match="does not rank models"):
        policy.load_policy([override])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("tie_tolerance=-1", "tie_tolerance=-1.0 (must be >= 0)"),
        ("max_disk_gb=nan", "max_disk_gb=nan (must be a finite number)"),
        ("max_serve_mem_gb=0", "max_serve_mem_gb=0.0 (must be > 0)"),
        ("max_acc_drop_points=-2", "max_acc_drop_points=-2.0 (must be >= 0)"),
    ],
)
def test_a_policy_value_out_of_range_is_refused_before_any_run_is_read(override, needle):
    with pytest.raises(ConfigError) as err:
        policy.load_policy([override])
    assert needle in str(err.value)


@pytest.fixture
def mixed_memory(tmp_path):
    """An 8B study on one H100: fp16 and gptq served by vLLM (serve_mem_gb read device-wide, KV cache and CUDA graphs
    included), aqlm by transformers' generate (CUDA's allocator peak of the job's own tensors)."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    vllm = GPU | {"bench_backend": "vllm"}
    for i, (method, tags, mem) in enumerate(
        (("fp16", vllm, 18.3), ("gptq", vllm, 8.6), ("aqlm_2bit", GPU | {"bench_backend": "hf"}, 5.0))
    ):
        log_run(client, exp, method, job_num=i, tags=tags, samples={"t1": correctness(N, 300)},
                metrics={"serve_mem_gb": mem, "tokens_per_s_1_stream": 100.0 + i})  # fmt: skip
    return uri


def test_a_memory_limit_is_not_applied_across_memory_figures_that_measured_different_things(mixed_memory):
    d = decide(mixed_memory, "max_serve_mem_gb=10", "tie_break=null")
    assert not any(x.won for x in d.values())
    reason = d["aqlm_2bit"].why
    assert "max_serve_mem_gb cannot be applied: serve_mem_gb was measured on different bases" in reason
    assert "cuda_device_used: fp16, gptq; cuda_allocator: aqlm_2bit" in reason
    anyway = decide(mixed_memory, "max_serve_mem_gb=10", "tie_break=null", "rank_across_backends=true")
    assert [m for m, x in anyway.items() if x.won] in (["gptq"], ["aqlm_2bit"])


def test_a_memory_metric_ranks_only_runs_whose_figures_measured_the_same_thing(mixed_memory):
    d = decide(mixed_memory, "rank_by=serve_mem_gb", "tie_break=null")
    assert not any(x.won for x in d.values())
    assert "serve_mem_gb cannot rank these runs" in d["gptq"].why


def test_quantbench_register_answers_a_bad_policy_value_with_the_paragraph_and_exit_2(three, caplog):
    from quantbench import registry

    with caplog.at_level("ERROR"):
        assert registry.main(["--tracking-uri", three, "--dry-run", "tie_tolerance=-1"]) == 2
    assert "tie_tolerance=-1.0 (must be >= 0)" in caplog.text
