"""ray's wheel carries dist-info folders under `ray/thirdparty_files` (psutil, colorama) whose RECORD has blank rows,
and `import ray` puts that folder on sys.path. From then on `importlib.metadata.packages_distributions()` raises
`TypeError: Distribution.files.<locals>.make_file() missing 1 required positional argument: 'name'`, and transformers
calls it when it is first imported. vLLM's CUDA engine imports ray, then spawns its engine core, which inherits that
sys.path and imports transformers: the engine died at start (ray 2.60.0, vLLM 0.26.0, Python 3.12;
tests/upstream/test_workarounds.py). Importing transformers first, with ray's folder off the path while it builds its
package map, works in both processes: before ray in ours, and in the spawned engine core that inherited the path.
"""

import sys
from pathlib import Path


def _is_ray_thirdparty(entry: str) -> bool:
    path = Path(entry)
    return path.name == "thirdparty_files" and path.parent.name == "ray"


def import_transformers_before_ray() -> None:
    """Import transformers with ray's bundled folder off sys.path, then put the path back as it was."""
    if "transformers" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not _is_ray_thirdparty(p)]
    try:
        import transformers  # noqa: F401  (its package-to-distribution map is built at import)
    finally:
        sys.path[:] = saved
