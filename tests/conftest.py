"""Shared, session-scoped fixtures: the embedded model is built once, the default sweep runs once.

End-to-end tests run the real CLI (`python run.py -m ...`) in a subprocess, against a real SQLite MLflow
store in a temporary folder, and assert on what the store holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantbench import schema
from quantbench.paths import ROOT, cache_root  # the one place that knows where things are

CACHE = cache_root()
schema.register()  # tests that compose the config with Hydra need the groups' schemas, as run.py does


@dataclass
class Store:
    """A finished CLI invocation and the MLflow store it wrote to."""

    uri: str
    artifacts: Path
    result: subprocess.CompletedProcess

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, experiment: str = "quantbench-tiny"):
        exp = self.client.get_experiment_by_name(experiment)
        assert exp is not None, f"no experiment {experiment!r}; CLI output:\n{self.result.stdout[-3000:]}"
        return self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def run_cli(*overrides: str, mlruns: Path, workdir: Path, timeout: int = 1800, check: bool = True) -> Store:
    """`python run.py <overrides>` with its store, outputs and sweep folders redirected into `mlruns`/`workdir`."""
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *overrides,
        f"paths.mlruns={mlruns}",
        f"hydra.sweep.dir={workdir}/multirun",
        f"hydra.run.dir={workdir}/outputs",
        f"quantized_cache.dir={workdir}/quantized",
    ]  # per test: a test that quantizes really quantizes
    env = {**os.environ, "QUANTBENCH_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)
    result.stdout = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-6000:]}")
    return Store(uri=f"sqlite:///{mlruns}/mlflow.db", artifacts=mlruns / "artifacts", result=result)


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    """The embedded model and its tasks, built (or taken from the cache) once per session."""
    from quantbench.fixtures import tiny

    return tiny.build(cache_dir=CACHE / "quantbench")


@pytest.fixture(scope="session")
def default_sweep(tiny_root, tmp_path_factory) -> Store:
    """The README's default sweep (`python run.py -m`): every default method on the embedded model, run once."""
    work = tmp_path_factory.mktemp("default_sweep")
    return run_cli("-m", mlruns=work / "mlruns", workdir=work)
