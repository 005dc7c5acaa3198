"""benchmarks/gpu/serve_folder.py: quantbench's bench step on a saved folder, run as its own process (how it is used
on the GPU test machine to compare kernels for one artifact)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CACHE, ROOT


@pytest.mark.e2e
def test_serve_folder_composes_the_typed_config_and_benchmarks_a_saved_model(tiny_root):
    """In a process of its own nothing has registered the groups' schemas: the script must, or Hydra cannot compose."""
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu/serve_folder.py"), str(tiny_root / "model"), "bench=smoke"]
    cmd += ["bench.repeats=1", "bench.streams=[1]", "bench.output_tokens=8"]
    env = {**os.environ, "QUANTBENCH_CACHE": str(CACHE)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["metrics"]["tokens_per_s_1_stream"] > 0
    assert result["tags"]["bench_backend"] == "hf"
