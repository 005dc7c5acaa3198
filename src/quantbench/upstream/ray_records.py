"""ray's wheel carries dist-info folders under `ray/thirdparty_files` (psutil, colorama) whose RECORD has blank rows,
and `import ray` puts that folder on sys.path. From then on `importlib.metadata.packages_distributions()` raises
`TypeError: Distribution.files.<locals>.make_file() missing 1 required positional argument: 'name'`, and transformers
calls it when it is first imported. vLLM's CUDA engine imports ray before transformers, so its engine core died at
start (ray 2.60.0, vLLM 0.26.0, Python 3.12; tests/upstream/test_workarounds.py). Importing transformers first
computes its mapping before ray's folder is on the path.
"""


def import_transformers_before_ray() -> None:
    import transformers  # noqa: F401  (its package-to-distribution map is built at import)
