"""The selection policy compares like with like: NaN passes no constraint, each metric ranks in the direction that
is better for it (or not at all), memory figures are held to one limit only where they measured the same thing, and
a policy value out of range is refused before any run is read."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from helpers.synthetic_store import correctness, log_run, make_store

from quantbench.study import policy
from quantbench.errors import ConfigError
from quantbench.study.runs import Store

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
    assert "max_serve_mem_gb cannot be applied: the runs' memory figures measured different things" in reason
    assert "serve_mem_gb: cuda_device_used: fp16, gptq; serve_mem_gb: cuda_allocator: aqlm_2bit" in reason
    anyway = decide(mixed_memory, "max_serve_mem_gb=10", "tie_break=null", "rank_across_backends=true")
    assert [m for m, x in anyway.items() if x.won] in (["gptq"], ["aqlm_2bit"])


def test_a_memory_metric_ranks_only_runs_whose_figures_measured_the_same_thing(mixed_memory):
    d = decide(mixed_memory, "rank_by=serve_mem_gb", "tie_break=null")
    assert not any(x.won for x in d.values())
    assert "serve_mem_gb cannot rank these runs" in d["gptq"].why


def test_quantbench_register_answers_a_bad_policy_value_with_the_paragraph_and_exit_2(three, caplog):
    from quantbench.study import registry

    with caplog.at_level("ERROR"):
        assert registry.main(["--tracking-uri", three, "--dry-run", "tie_tolerance=-1"]) == 2
    assert "tie_tolerance=-1.0 (must be >= 0)" in caplog.text


@pytest.fixture
def four(tmp_path):
    """fp16 and three 4-bit runs on one CPU: one significantly worse, one with NaN KL, one with NaN tokens/s."""
    uri, client, exp = make_store(tmp_path / "mlruns")
    runs = {
        "fp16": (correctness(N, 300), {"weight_gb": 16.0, "tokens_per_s_1_stream": 100.0, "quality_kl_mean": 0.0}),
        "gptq": (correctness(N, 300, 2, 2), {"weight_gb": 5.7, "tokens_per_s_1_stream": 200.0, "quality_kl_mean": 0.01}),
        "awq": (correctness(N, 300, 2, 1), {"weight_gb": 5.9, "tokens_per_s_1_stream": 250.0, "quality_kl_mean": math.nan}),
        "aqlm_2bit": (correctness(N, 300, 60), {"weight_gb": 2.6, "tokens_per_s_1_stream": math.nan, "quality_kl_mean": 0.2}),
    }  # fmt: skip
    for i, (method, (acc, metrics)) in enumerate(runs.items()):
        log_run(client, exp, method, job_num=i, samples={"t1": acc}, metrics=metrics)
    return uri


# (recommend's flags, the policy's keys): the same constraints, each set by both commands' names
SAME_ASK = [
    ([], []),
    (["--max-kl-mean", "0.05"], ["max_kl_mean=0.05"]),  # awq's KL is NaN: it passes no limit
    (["--gpu-memory-gb", "5.8"], ["max_serve_mem_gb=5.8"]),
    (["--min-tokens-per-s", "150", "--max-kl-mean", "0.05"], ["min_tokens_per_s_1_stream=150", "max_kl_mean=0.05"]),
    (["--min-accuracy", "0.9"], ["min_accuracy=0.9"]),  # no eligible run
    (["--gpu-memory-gb", "3"], ["max_serve_mem_gb=3"]),  # aqlm fits, but its tokens/s are NaN: nothing to rank
]


@pytest.mark.parametrize("flags, keys", SAME_ASK)
def test_register_and_recommend_give_the_same_answer_to_the_same_constraints(four, flags, keys, caplog):
    """`quantbench recommend` ranks by speed among the runs within noise; the same policy, asked of `register`, must
    choose the same run (or none), since one engine (policy.choose) answers both."""
    from quantbench.study import recommend, registry

    st = Store(four)
    sel = st.select("quantbench-tiny")
    as_recommend = ["rank_by=tokens_per_s_1_stream", "tie_tolerance=0", "tie_break=null", "prefer_within_noise=true",
                    "max_acc_drop_points=null"]  # fmt: skip
    decided = policy.choose(sel, st.compare(sel), policy.load_policy([*as_recommend, *keys])).winner
    with caplog.at_level("INFO"):
        rc = recommend.main(["--tracking-uri", four, *flags])
        chosen = next((line for line in caplog.messages if line.startswith("Recommendation: ")), "")
    assert rc == (0 if decided else 1)
    if decided:
        assert chosen.startswith(f"Recommendation: {decided.row.label} (run {decided.row.run_id})")
    caplog.clear()
    with caplog.at_level("INFO"):
        rc = registry.main(["--tracking-uri", four, "--dry-run", *as_recommend, *keys])
    assert rc == (0 if decided else 1)
    assert (f"WON  {decided.row.label}" in caplog.text) if decided else "No run satisfies the policy" in caplog.text


def test_the_expected_answers_of_the_same_ask(four):
    st = Store(four)
    sel = st.select("quantbench-tiny")
    comps = st.compare(sel)

    def winner(**asked):
        from quantbench.study import recommend

        won = recommend.recommend(sel, comps, policy.Constraints(**asked)).choice
        return won.row.method if won else None

    assert winner() == "awq"  # the fastest within noise; aqlm is significantly worse and has no tokens/s
    assert winner(max_kl_mean=0.05) == "gptq"  # awq's KL is NaN
    assert winner(max_serve_mem_gb=5.8) == "gptq"
    assert winner(min_accuracy=0.9) is None
    assert winner(max_serve_mem_gb=3) is None


@pytest.mark.parametrize("old, new", list(policy.ALIASES.items()))
def test_each_old_name_is_its_constraint_s_one_name(old, new):
    """The aliases documented commands use (README, Makefile, docs) map to the one name, for the policy's keys and
    recommend's flags alike."""
    from quantbench.study import recommend

    assert new in {f.name for f in fields(policy.Constraints)} and policy.canonical(old) == new
    assert getattr(policy.load_policy([f"{old}=1"] if old != "across_backends" else [f"{old}=true"]), new) in (1, True)
    flags = recommend._flags(new)
    assert flags[0] == f"--{new.replace('_', '-')}" and f"--{old.replace('_', '-')}" in flags
