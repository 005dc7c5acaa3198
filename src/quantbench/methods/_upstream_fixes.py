"""Narrow, scoped workarounds for defects of the quantization libraries, all in one place.

Each workaround is a context manager that changes process state only while a method calls the library and puts
it back afterwards, so a later job of the same process (Hydra multirun) sees an untouched process. Each one names
the upstream defect; tests/test_upstream_fixes.py fails as soon as a workaround stops being needed or working,
which is the signal to delete it here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The fewest workers GPTQModel 7.6's "cpu" pool needs: its hard-coded child pool "model_loader:cpu" asks for 2.
GPTQMODEL_MIN_CPU_WORKERS = 2


@contextmanager
def llmcompressor_scope() -> Iterator[None]:
    """Run llm-compressor's AWQ on a machine without an accelerator, and undo its process-wide leftovers.

    Defect (llm-compressor 0.14.0.1): `AWQModifier._apply_smoothing` calls `IntermediatesCache.pin_memory` for
    every cached batch unconditionally; `Tensor.pin_memory()` needs an accelerator, so AWQ on a CPU-only machine
    dies with "Cannot access accelerator device when none is available". Pinning only speeds host-to-device
    copies, so skipping it where there is no accelerator changes no result.

    Leftovers undone on exit: `Oneshot.__init__` sets TOKENIZERS_PARALLELISM=false in os.environ when unset, the
    first import adds KMP_DUPLICATE_LIB_OK, KMP_INIT_AT_FORK (sklearn) and TORCHINDUCTOR_CACHE_DIR (torch inductor),
    and the global compression session keeps the last model (and its recipe state) referenced until the next
    oneshot. Import llm-compressor inside this block.
    """
    env = dict(
        os.environ
    )  # before the import: importing llm-compressor (sklearn, inductor) sets KMP_*, TORCHINDUCTOR_*
    from llmcompressor.core import reset_session
    from llmcompressor.pipelines.cache import IntermediatesCache

    original_pin = IntermediatesCache.pin_memory
    patched = not torch.accelerator.is_available()
    if patched:
        IntermediatesCache.pin_memory = _skip_pin_memory  # type: ignore[method-assign]
    try:
        yield
    finally:
        if patched:
            IntermediatesCache.pin_memory = original_pin  # type: ignore[method-assign]
        _restore_environ(env)
        reset_session()


def _skip_pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
    """`IntermediatesCache.pin_memory` without an accelerator: nothing to pin for."""


@contextmanager
def gptqmodel_scope(log_dir: Path | None = None) -> Iterator[None]:
    """Import and call GPTQModel without it changing the user's environment; give it the workers it needs.

    Defects (GPTQModel 7.6.0):
    - Importing it rewrites os.environ for the whole process and its children: its dependency tokenicer points
      HF_HOME, HF_HUB_CACHE, TRANSFORMERS_CACHE and HF_MODULES_CACHE at /tmp/tokenicer_hf_home (a later
      `datasets` import or a vLLM worker would cache there), and gptqmodel sets PYTORCH_ALLOC_CONF and
      CUDA_DEVICE_ORDER. Every variable it adds or changes inside this block is put back on exit.
    - Its device thread pool hard-codes a child pool "model_loader:cpu" of 2 workers, but sizes the parent "cpu"
      pool at (cpu_count + 1) // 2, so on a machine of 1 or 2 cores every load fails with "Virtual pool
      'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1". GPTQMODEL_CPU_WORKERS=2 is set for the
      block when the user has not set it and the default would be too small. The pool is built once per process,
      on first use, so setting it while GPTQModel runs is enough.
    - Its quantization loop writes per-layer JSON logs to `logs/` under the current working directory
      (gptqmodel.looper.loop_processor._PROJECT_LOG_DIR = Path("logs")), i.e. into the user's checkout. With
      `log_dir`, they go there instead (the job's output folder), and the constant is put back on exit.
    """
    env = dict(os.environ)
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and _gptqmodel_default_cpu_workers() < GPTQMODEL_MIN_CPU_WORKERS:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(GPTQMODEL_MIN_CPU_WORKERS)
    processor = saved_dir = None
    try:
        if log_dir is not None:
            from gptqmodel.looper import loop_processor as processor

            saved_dir, processor._PROJECT_LOG_DIR = processor._PROJECT_LOG_DIR, Path(log_dir)
        yield
    finally:
        if processor is not None:
            processor._PROJECT_LOG_DIR = saved_dir
        _restore_environ(env)


def _gptqmodel_default_cpu_workers() -> int:
    """GPTQModel 7.6's default size of its "cpu" pool (gptqmodel._default_cpu_workers, GIL builds)."""
    return min(12, max(1, ((os.cpu_count() or 1) + 1) // 2))


def _restore_environ(before: dict[str, str]) -> None:
    """Undo every change made to os.environ since `before` was taken, and log what was undone."""
    changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
    for key in changed:
        if key in before:
            os.environ[key] = before[key]
        else:
            del os.environ[key]
    if changed:
        log.debug("Restored environment variables changed by a quantization library: %s", changed)
