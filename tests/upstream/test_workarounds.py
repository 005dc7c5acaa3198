"""Each workaround in quantbench.upstream.quantizers, twice: the raw upstream code still has the defect (when
this fails, upstream fixed it: delete the workaround), and the workaround still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from helpers.run_if import run_if
from quantbench.upstream import mlflow_registry, quantizers

sys.path.insert(0, str(ROOT / "benchmarks"))
import auto_round_cpu_layout  # noqa: E402  (a 4-bit layer of auto-round's torch kernel)

# the pin_memory defect only shows without an accelerator
no_accelerator = run_if(accelerator=False)


def _cache_with_one_cpu_tensor():
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    value = torch.arange(4.0)
    return IntermediatesCache([{"x": IntermediateValue(value=value, device=None)}], offload_device=None), value


# --- llm-compressor 0.14: AWQ pins memory without an accelerator --------------------------------------------------


@no_accelerator
def test_llmcompressor_still_pins_memory_without_an_accelerator():
    with quantizers.llmcompressor_scope():  # only to keep the import's environment changes out of this process
        cache, _ = _cache_with_one_cpu_tensor()
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)


@no_accelerator
def test_llmcompressor_scope_skips_pinning_then_puts_everything_back(monkeypatch):
    from llmcompressor.pipelines.cache import IntermediatesCache

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    original = IntermediatesCache.pin_memory
    with quantizers.llmcompressor_scope():
        cache, value = _cache_with_one_cpu_tensor()
        cache.pin_memory(0)  # no error
        assert cache.fetch(0)["x"] is value
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # what llm-compressor's Oneshot does
    assert IntermediatesCache.pin_memory is original
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_llmcompressor_scope_releases_the_sessions_model():
    from llmcompressor.core import active_session

    with quantizers.llmcompressor_scope():
        active_session().state.model = torch.nn.Linear(2, 2)  # what oneshot leaves behind
    assert active_session().state.model is None


# --- GPTQModel 7.6: import rewrites os.environ; its thread pool cannot be built on 1-2 cores -----------------------

# Runs in a fresh interpreter (the import's effects happen once per process), as if the machine had 2 cores.
PROBE = """
import json, os, sys
os.cpu_count = lambda: 2
for key in ("GPTQMODEL_CPU_WORKERS", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE"):
    os.environ.pop(key, None)
before = dict(os.environ)
fixed = sys.argv[1] == "fixed"
pool_error = None
if fixed:
    from quantbench.upstream.quantizers import gptqmodel_scope
    with gptqmodel_scope():
        import gptqmodel
        try:
            gptqmodel.get_device_thread_pool()
        except ValueError as exc:
            pool_error = str(exc)
else:
    import gptqmodel
    try:
        gptqmodel._build_device_thread_pool()
    except ValueError as exc:
        pool_error = str(exc)
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print(json.dumps({"changed": changed, "pool_error": pool_error}))
os._exit(0)  # the pool's worker threads would keep the interpreter alive
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.e2e
def test_gptqmodel_still_changes_the_environment_and_cannot_build_its_pool_on_2_cores():
    raw = _probe("raw")
    assert "HF_HOME" in raw["changed"], raw  # tokenicer's /tmp/tokenicer_hf_home
    assert raw["pool_error"] and "model_loader:cpu" in raw["pool_error"], raw


@pytest.mark.e2e
def test_gptqmodel_scope_keeps_the_environment_and_builds_the_pool_on_2_cores():
    fixed = _probe("fixed")
    assert fixed == {"changed": [], "pool_error": None}


def test_gptqmodel_still_logs_into_the_working_directory_and_the_scope_redirects_it(tmp_path):
    """Upstream writes per-layer logs to ./logs; inside gptqmodel_scope(log_dir=...) they go to the job folder."""
    from pathlib import Path

    from quantbench.upstream.quantizers import gptqmodel_scope

    with gptqmodel_scope():
        from gptqmodel.looper import loop_processor
    assert loop_processor._PROJECT_LOG_DIR == Path("logs")  # fails once upstream stops writing into the cwd
    with gptqmodel_scope(log_dir=tmp_path):
        assert loop_processor._PROJECT_LOG_DIR == tmp_path
    assert loop_processor._PROJECT_LOG_DIR == Path("logs")


# --- ray 2.60 + Python's importlib.metadata: a dist-info with a blank RECORD row (upstream/ray_records.py) -----------

# What `import ray` does to sys.path (ray/thirdparty_files), with a dist-info like the psutil and colorama ones ray
# 2.60.0 carries there on the GPU machine: a RECORD with a blank row.
AFTER_RAY = """
import sys, pathlib, tempfile
root = pathlib.Path(tempfile.mkdtemp()) / "ray" / "thirdparty_files"
info = root / "psutil-7.2.2.dist-info"
info.mkdir(parents=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\\nName: psutil\\nVersion: 7.2.2\\n")
(info / "RECORD").write_text("psutil/__init__.py,,\\n\\npsutil-7.2.2.dist-info/RECORD,,\\n")
sys.path.insert(0, str(root))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importlib_metadata_still_fails_on_a_blank_record_row():
    """When this fails, Python reads such a RECORD: delete upstream/ray_records.py."""
    out = _python(AFTER_RAY + "import importlib.metadata as m\nm.packages_distributions()")
    assert "make_file() missing 1 required positional argument" in out.stderr


def test_transformers_imported_first_survives_what_ray_does_to_the_path():
    broken = _python(AFTER_RAY + "import transformers")  # vLLM's CUDA engine core, before the workaround
    assert broken.returncode != 0 and "make_file()" in broken.stderr
    fixed = _python("import quantbench.job.bench.backends._vllm_engine\n" + AFTER_RAY + "import transformers.utils")
    assert fixed.returncode == 0, fixed.stderr[-2000:]


@pytest.mark.parametrize("main", ["_vllm_engine", "_vllm_server"])
def test_an_engine_core_spawned_after_ray_imports_transformers_without_rays_folder(main):
    """vLLM's spawned engine core inherits the path `import ray` left in the parent, then imports our module (its
    __mp_main__: the offline engine's, or the server's) first: transformers must build its map without ray's folder,
    and the path must stay as it was."""
    check = "assert any(p.endswith('ray/thirdparty_files') for p in sys.path)\n"
    spawned = _python(AFTER_RAY + f"import quantbench.job.bench.backends.{main}, transformers.utils\n" + check)
    assert spawned.returncode == 0, spawned.stderr[-2000:]


# --- auto-round 0.15.1: its CPU kernel multiplies by a contiguous [in, out] weight (quantizers.auto_round_linear_layout)


class _Products(torch.overrides.TorchFunctionMode):
    """Records each torch.matmul / F.linear call: the function and its right operand's shape and contiguity."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.nn.functional.linear):
            self.calls.append((func.__name__, tuple(args[1].shape), args[1].is_contiguous()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", [0, 1], ids=["auto_gptq", "auto_round"])
def test_auto_rounds_cpu_kernel_still_multiplies_by_a_contiguous_in_by_out_weight(which):
    """When this fails, auto-round multiplies in another layout: delete auto_round_linear_layout."""
    layer = auto_round_cpu_layout.layer(256, 64, quantizers.auto_round_torch_layers()[which])
    with torch.no_grad(), _Products() as products:
        layer(torch.randn(8, 256, dtype=torch.bfloat16))
    assert products.calls == [("matmul", (256, 64), True)]


@pytest.mark.parametrize("which", [0, 1], ids=["auto_gptq", "auto_round"])
def test_auto_round_linear_layout_gives_the_same_product_through_linear(which):
    layer = auto_round_cpu_layout.layer(256, 64, quantizers.auto_round_torch_layers()[which])
    x = torch.randn(8, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Sequential(layer)
    with torch.no_grad():
        before = model(x).float()
        assert quantizers.auto_round_linear_layout(model) == 1
        assert quantizers.auto_round_linear_layout(model) == 0  # once per layer
        with _Products() as products:
            after = model(x).float()
        in_float32 = layer.forward.args[0](x.float()).float()  # the unchanged forward, all in float32
        with _Products() as one_row:
            model(x[:1])  # a one-stream decode step keeps auto-round's own product
    assert [name for name, _, _ in products.calls] == ["linear"]
    assert products.calls[0][1:] == ((64, 256), True)
    assert one_row.calls == [("matmul", (256, 64), True)]
    scale = in_float32.abs().max()
    assert (after - in_float32).abs().max() <= 2**-7 * scale  # within bfloat16's rounding of the largest output
    assert (after - before).abs().max() <= 2**-7 * scale


# --- MLflow 3.17: registry calls resolved with the global URIs (upstream/mlflow_registry.py) -------------------------


def _store_with_a_champion(root: Path) -> str:
    """A SQLite store whose registered model `m` has version 1, a folder of one file, under the alias `champion`."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=folder.as_uri())
    client.set_registered_model_alias("m", "champion", "1")
    return uri


DOWNLOAD = (
    "import sys, mlflow; print(mlflow.artifacts.download_artifacts('models:/m@champion', dst_path=sys.argv[2], "
    "tracking_uri=sys.argv[1]))"
)


def test_mlflow_still_resolves_an_alias_with_the_global_registry_not_the_uri_it_is_given(tmp_path):
    uri = _store_with_a_champion(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in mlflow_registry.ENV}
    (elsewhere := tmp_path / "cwd").mkdir()  # where MLflow's default store goes
    out = subprocess.run([sys.executable, "-c", DOWNLOAD, uri, str(tmp_path / "dst")], capture_output=True,
                         text=True, cwd=elsewhere, env=env, timeout=300)  # fmt: skip
    assert out.returncode != 0 and "Registered Model with name=m not found" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("before", [None, "sqlite:////elsewhere/mlflow.db"])
def test_global_uris_resolves_the_alias_then_leaves_the_globals_and_environment_as_they_were(
    tmp_path, monkeypatch, before
):
    import mlflow

    uri = _store_with_a_champion(tmp_path)
    for key in mlflow_registry.ENV:
        monkeypatch.delenv(key, raising=False) if before is None else monkeypatch.setenv(key, before)
    was = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), {k: os.environ.get(k) for k in mlflow_registry.ENV}
    with mlflow_registry.global_uris(uri):
        folder = mlflow.artifacts.download_artifacts("models:/m@champion", dst_path=str(tmp_path / "dst"))
    assert (Path(folder) / "config.json").exists()
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == was[:2]
    assert {k: os.environ.get(k) for k in mlflow_registry.ENV} == was[2]
