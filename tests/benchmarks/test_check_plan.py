"""benchmarks/gpu/check_plan.py: a GPU stretch's plan checked on this machine, before device time is spent on it."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import check_plan  # noqa: E402


def test_the_next_stretchs_plan_composes_line_by_line():
    """The newest plan is the one the next GPU stretch runs (benchmarks/gpu/queue.sh start PLAN)."""
    assert check_plan.check(check_plan.newest_plan(), "h100") == []


def test_each_mistake_the_gpu_would_meet_minutes_in_is_named_by_its_line(tmp_path):
    plan = tmp_path / "plan.sh"
    plan.write_text(
        "seed benchmarks/results/2026-12-08-h100\n"
        "S=(bench.streams=[1,8] bench.vllm.kv_cache_gb=2)\n"
        'job 1-fine rtn "${S[@]}" force=true\n'
        "job 2-typo rtn bench.vllm.kv_cache_gbb=2\n"
        "job 3-range fp16 bench.streams=[0]\n"
        "job 4-bits gptq method.bits=5\n"
        "job 5-group awq method.group_size=100\n"
        "job 6-method gptqq\n"
        'step 7-search python run.py -m search=nope hardware="$QB_HARDWARE" paths.mlruns="$W/mlruns"\n'
        "step 8-search python run.py -m search=w4a16_h100 hydra.sweeper.n_trials=4\n"
        "step 9-listing bash -c 'ls'\n"
        "seed benchmarks/results/nowhere\n"
    )
    failures = check_plan.check(plan, "h100")
    assert [f.split(":")[0] for f in failures] == [
        "2-typo",
        "3-range",
        "4-bits",
        "5-group",
        "6-method",
        "7-search",
        "seed",
    ]
    named = dict(f.split(": ", 1) for f in failures)
    assert "bench.vllm.kv_cache_gbb" in named["2-typo"]
    assert "bench.streams=[0]" in named["3-range"]
    assert "method.bits=5" in named["4-bits"]
    assert "method.group_size=100" in named["5-group"] and "14336" in named["5-group"]  # the 8B shape's widths
    assert "method/gptqq" in named["6-method"] and "search/nope" in named["7-search"]
    assert "nowhere" in named["seed"]
