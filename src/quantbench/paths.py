"""Where the project and its caches are, in one place: the Hydra app, the CLI, the readers of a store and the
tests all ask here (Hydra's `paths.*` config resolves to the same folders through the same variables)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# The project root: conf/ lives here, and mlruns/, multirun/ and .cache/ by default.
ROOT = Path(os.environ.get("QUANTBENCH_ROOT") or Path(__file__).resolve().parents[2])


def cache_root() -> Path:
    """The project cache (`paths.cache`): QUANTBENCH_CACHE, else <root>/.cache."""
    return Path(os.environ.get("QUANTBENCH_CACHE") or ROOT / ".cache")


def unique_suffix() -> str:
    """A random suffix for the run and sweep folders (conf/hydra/default.yaml: `${quantbench.unique:}`), drawn once per
    process and config (the resolver caches it; Hydra copies the cache into each job of a sweep and to Ray and SLURM
    workers): two processes started in the same second get folders of their own."""
    return secrets.token_hex(4)
