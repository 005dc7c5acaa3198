"""A backend added from outside quantbench is one module (tests/helpers/echo_backend.py), one bench YAML and its
import path in QUANTBENCH_BACKENDS: nothing in src/ names it, yet Hydra types its knob, bench.plan checks it, and a
real job runs it and logs the knob as a param."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from quantbench.job import bench
from quantbench.errors import ConfigError

from conftest import ROOT, run_cli
from helpers import echo_backend

ECHO_YAML = """\
defaults:
  - bench_schema
  - _self_
name: echo
backend: echo
prompt_tokens: 8
output_tokens: 8
streams: [1]
warmup: 0
repeats: 1
echo:
  tokens_per_s: 1234.0
"""


def test_the_plan_reads_and_checks_a_plugin_backends_knob(monkeypatch):
    known = bench.registry()
    monkeypatch.setattr(bench, "registry", lambda: {**known, "echo": echo_backend.BACKEND})
    cfg = OmegaConf.create(
        {"backend": "echo", "prompt_tokens": 8, "output_tokens": 8, "streams": [1], "warmup": 0, "repeats": 1}
    )
    plan = bench.plan(OmegaConf.merge(cfg, {"echo": {"tokens_per_s": 50.0}}))
    assert plan.knobs["echo"] == echo_backend.EchoKnobs(tokens_per_s=50.0) and not bench.loads_from_disk(plan)
    result = echo_backend.BACKEND.run(plan, None, None, None, None)
    assert result.metrics["tokens_per_s_1_stream"] == pytest.approx(50.0)
    with pytest.raises(ConfigError, match=r"bench.echo.tokens_per_s=0 \(must be > 0\)"):
        bench.plan(OmegaConf.merge(cfg, {"echo": {"tokens_per_s": 0}}))
    with pytest.raises(ConfigError, match=r"bench.echo has unknown keys \['speed'\]"):
        bench.plan(OmegaConf.merge(cfg, {"echo": {"speed": 1}}))


@pytest.mark.e2e
def test_a_plugin_backend_runs_through_a_real_job_with_its_knob_logged(tiny_root, tmp_path):
    (tmp_path / "conf" / "bench").mkdir(parents=True)
    (tmp_path / "conf" / "bench" / "echo.yaml").write_text(ECHO_YAML)
    env = {
        "QUANTBENCH_BACKENDS": "helpers.echo_backend",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p),
    }
    common = [f"--config-dir={tmp_path / 'conf'}", "method=fp16", "eval=none", "quality=none", "bench=echo"]
    store = run_cli(*common, "bench.echo.tokens_per_s=4321", mlruns=tmp_path / "mlruns", workdir=tmp_path, env=env)
    (run,) = store.runs()
    assert run.info.status == "FINISHED", store.result.stdout[-3000:]
    assert run.data.params["bench.echo.tokens_per_s"] == "4321.0" and run.data.params["bench.backend"] == "echo"
    assert run.data.tags["bench_backend"] == "echo"
    assert run.data.metrics["tokens_per_s_1_stream"] == pytest.approx(4321.0)  # the knob reached run()
    # Hydra types the plugin's knob as it does vLLM's: a wrong type or an unknown key stops the command
    for bad, needle in (("bench.echo.tokens_per_s=fast", "tokens_per_s"), ("+bench.echo.speed=1", "speed")):
        refused = run_cli(*common, bad, mlruns=tmp_path / "mlruns", workdir=tmp_path, env=env, check=False)
        assert refused.result.returncode != 0 and needle in refused.result.stdout, refused.result.stdout[-2000:]
