"""Where the project and its caches are, in one place: the Hydra app, the CLI, the readers of a store and the
tests all ask here (Hydra's `paths.*` config resolves to the same folders through the same variables)."""

from __future__ import annotations

import os
from pathlib import Path

# The project root: conf/ lives here, and mlruns/, multirun/ and .cache/ by default.
ROOT = Path(os.environ.get("QUANTBENCH_ROOT") or Path(__file__).resolve().parents[2])


def cache_root() -> Path:
    """The project cache (`paths.cache`): QUANTBENCH_CACHE, else <root>/.cache."""
    return Path(os.environ.get("QUANTBENCH_CACHE") or ROOT / ".cache")
