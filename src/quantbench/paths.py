"""Where the project and its caches are, in one place: the Hydra app, the CLI, the readers of a store and the
tests all ask here (Hydra's `paths.*` config resolves to the same folders through the same variables)."""

from __future__ import annotations

import os
import hashlib
import secrets
from pathlib import Path

# The project root: conf/ lives here, and mlruns/, multirun/ and .cache/ by default.
ROOT = Path(os.environ.get("QUANTBENCH_ROOT") or Path(__file__).resolve().parents[2])
# `model.pretrained=embedded:<name>`: a model the project builds (quantbench.embedded), not a folder or hub id
EMBEDDED_PREFIX = "embedded:"


def cache_root() -> Path:
    """The project cache (`paths.cache`): QUANTBENCH_CACHE, else <root>/.cache."""
    return Path(os.environ.get("QUANTBENCH_CACHE") or ROOT / ".cache")


def unique_suffix() -> str:
    """A random suffix for the run and sweep folders (conf/hydra/default.yaml: `${quantbench.unique:}`), drawn once per
    process and config (the resolver caches it; Hydra copies the cache into each job of a sweep and to Ray and SLURM
    workers): two processes started in the same second get folders of their own."""
    return secrets.token_hex(4)


# Config keys that say where a job writes and logs, not what it measures: the one list. Sweep job folders are named
# without them (conf/hydra/default.yaml's override_dirname.exclude_keys: Hydra reads it there, and a test holds it
# equal to this); run labels and the sweep summary leave out overrides of any key of their groups and of hydra
# (LOCATION_PREFIXES); the job key leaves out their groups whole (identity.NOT_IN_CONFIG_HASH).
LOCATION_KEYS = ("tracking.uri", "paths.root", "paths.mlruns", "paths.cache", "quantized_cache.dir")
LOCATION_GROUPS = tuple(dict.fromkeys(key.split(".")[0] for key in LOCATION_KEYS))  # tracking, paths, quantized_cache
LOCATION_PREFIXES = tuple(f"{group}." for group in ("hydra", *LOCATION_GROUPS))

DIRNAME_LIMIT = 120  # characters: a file name may have 255 bytes, and Hydra prefixes the job number


def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder name from its overrides (`${quantbench.dirname:${hydra.job.override_dirname}}`): as Hydra
    writes it while it is short, else cut with a hash of the whole appended, so that a job with many overrides (the
    seed study with its sizes) gets a folder instead of "File name too long". '/' (a path given as a value) would
    make nested folders: it becomes '_'."""
    name = override_dirname.replace("/", "_")
    if len(name) <= DIRNAME_LIMIT:
        return name
    return f"{name[: DIRNAME_LIMIT - 9]}~{hashlib.sha256(override_dirname.encode()).hexdigest()[:8]}"


def content_view(folder: Path, content_key: str, cache: Path) -> Path:
    """A path named after what `folder` holds (`<cache>/quantbench/served/<content_key>`, a link to it; `cache`:
    paths.cache), for tools that key their own caches by the path they are given: vLLM hashes the model path into its
    torch.compile cache key, so serving every copy of one artifact (a rerun, a cache hit, another job) from one path
    reuses the compiled graph instead of compiling again. The link is swapped in atomically; copies with one key hold
    the same bytes."""
    view = Path(cache) / "quantbench" / "served" / content_key
    view.parent.mkdir(parents=True, exist_ok=True)
    staged = view.with_name(f"{content_key}.{secrets.token_hex(4)}")
    staged.symlink_to(Path(folder).resolve(), target_is_directory=True)
    os.replace(staged, view)
    return view
