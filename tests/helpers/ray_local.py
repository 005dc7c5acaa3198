"""A local Ray head for one test's sweep (`hydra/launcher=ray` with two CPUs), and how many runs overlapped."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def local_ray(monkeypatch):
    """Yield the overrides of a sweep on a local Ray head with two CPUs; its folder is removed after."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="qbray", dir="/tmp"))  # Ray's socket paths must stay under 107 characters
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a local head
    try:
        yield [
            "hydra/launcher=ray",
            "+hydra.launcher.ray.init.num_cpus=2",
            f"+hydra.launcher.ray.init._temp_dir={ray_tmp}",
        ]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def most_at_once(runs) -> int:
    """The most MLflow runs that were running at one moment."""
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)
