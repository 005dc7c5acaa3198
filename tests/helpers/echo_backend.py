"""A benchmark backend from outside quantbench, with one knob (tests/job/bench/test_backend_plugin.py): it times
nothing and reports `bench.echo.tokens_per_s` for every stream count, so a test can see its knob reach `run`.

Registered as every backend outside quantbench is: its import path in QUANTBENCH_BACKENDS
(`QUANTBENCH_BACKENDS=helpers.echo_backend`, with tests/ on PYTHONPATH), and a bench config with `backend: echo`.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantbench.job.bench import BenchPlan, BenchResult, speed_metrics
from quantbench.job.bench.backends.base import Backend


@dataclass
class EchoKnobs:
    """`bench.echo`: the speed to report."""

    tokens_per_s: float = 100.0


class Echo(Backend):
    name = "echo"
    Knobs = EchoKnobs

    def knob_problems(self, knobs: EchoKnobs, plan: BenchPlan) -> list[str]:
        return [] if knobs.tokens_per_s > 0 else [f"bench.echo.tokens_per_s={knobs.tokens_per_s} (must be > 0)"]

    def run(self, plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
        tps = self.knobs(plan).tokens_per_s
        runs = [
            {"streams": n, "seconds": [n * plan.output_tokens / tps] * plan.repeats, "ttft_s": [0.0] * plan.repeats}
            for n in plan.streams
        ]
        metrics, tags = speed_metrics(runs, plan.output_tokens)
        return BenchResult(metrics, {"bench_backend": "echo", **tags}, {"backend": "echo", "runs": runs})


BACKEND = Echo()
