"""Narrow, scoped workarounds for defects of the quantization libraries (llm-compressor, GPTQModel, auto-round,
aqlm and transformers' AQLM integration), in one module.

Most are context managers that change process state only while a method calls the library and put it back
afterwards, so a later job of the same process (Hydra multirun) sees an untouched process. Each one names the
upstream defect; a test fails as soon as a workaround stops being needed or working (quantbench.upstream lists
them), which is the signal to delete it here.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import random
import sys
import threading
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


# -- auto-round --------------------------------------------------------------------------------------------------


def release_auto_round_state() -> None:
    """auto-round keeps the model in process-wide singletons; drop them so a multirun's next job can free it."""
    from auto_round.compressors.shard_writer import ShardWriter
    from auto_round.context.compress import CompressContext
    from auto_round.context.model import ModelContext

    CompressContext.reset_context()
    ModelContext.reset_context()
    ShardWriter.reset()
    gc.collect()


@contextlib.contextmanager
def auto_round_state_restored():
    """Undo the process-wide settings auto-round changes while it runs (jobs of a multirun share one process):
    it sets CUBLAS_WORKSPACE_CONFIG, turns on torch deterministic algorithms, reseeds the global RNGs and changes
    torch's print options."""
    import numpy as np

    environ = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    opts = torch._tensor_str.PRINT_OPTS
    print_options = dict(
        precision=opts.precision,
        threshold=opts.threshold,
        edgeitems=opts.edgeitems,
        linewidth=opts.linewidth,
        sci_mode=opts.sci_mode,
    )
    py_rng, np_rng = random.getstate(), np.random.get_state()
    grad, threads, default_dtype = torch.is_grad_enabled(), torch.get_num_threads(), torch.get_default_dtype()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_printoptions(**print_options)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
        torch.set_default_dtype(default_dtype)


def auto_round_torch_layers() -> tuple[type, ...]:
    """auto-round's plain-torch QuantLinear classes (the auto_round and auto_gptq formats' CPU kernels)."""
    from auto_round_extension.torch.qlinear_torch import QuantLinear as Gptq
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as AutoRound

    return Gptq, AutoRound


REDUCED_DTYPES = (torch.bfloat16, torch.float16)


class _MatmulInLinearLayout(torch.overrides.TorchFunctionMode):
    """torch.matmul(x, w), w a contiguous [in, out] bfloat16/float16 CPU matrix, computed as F.linear(x, w.T)
    with w.T made contiguous: the same product, through the weight layout that CPU GEMMs are built for."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.matmul and len(args) == 2 and not kwargs:
            x, w = args
            if w.dim() == 2 and w.is_contiguous() and w.device.type == "cpu" and w.dtype in REDUCED_DTYPES:
                return torch.nn.functional.linear(x, w.t().contiguous())
        return func(*args, **kwargs)


def _forward_in_linear_layout(forward, x):
    if x.numel() == x.shape[-1]:  # one row (a one-stream decode step): the mode's dispatch costs more than it saves
        return forward(x)
    with _MatmulInLinearLayout():
        return forward(x)


def auto_round_linear_layout(model: torch.nn.Module) -> int:
    """Make auto-round's plain-torch CPU kernel multiply in the weight layout that CPU GEMMs are built for.

    Upstream defect (auto-round 0.15.1, auto_round_extension/torch/qlinear_torch*.py `forward`): each forward
    dequantizes the weight to a contiguous [in, out] matrix and calls torch.matmul(x, weights). torch 2.13's CPU
    GEMM in bfloat16 takes a slow path for that layout on a CPU without native bfloat16 (AVX2): against the [out, in]
    layout nn.Linear uses, 7-9x slower on the embedded model's layers and 31x on an 8B MLP layer
    (benchmarks/auto_round_cpu_layout.py). The product is the same: only the layout of the right operand changes
    (the distance to a float32 product is the same within bfloat16 rounding; the benchmark prints it). Returns the
    number of layers changed.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, auto_round_torch_layers())
        and m.qweight.device.type == "cpu"
        and not getattr(m, "_quantbench_linear_layout", False)
    ]
    for m in layers:
        m.forward = functools.partial(_forward_in_linear_layout, m.forward)
        m._quantbench_linear_layout = True
    if layers:
        log.info(
            "auto-round CPU kernel: %d layer(s) multiply in nn.Linear's weight layout (auto-round 0.15.1's "
            "[in, out] layout takes torch's slow bfloat16 GEMM path)",
            len(layers),
        )
    return len(layers)


# -- aqlm and transformers' AQLM integration ------------------------------------------------------------------------


def fix_not_to_quantize(quantization_config: dict) -> dict:
    """Add module names for the weight names in `linear_weights_not_to_quantize`.

    Upstream defect (transformers 5.17): AqlmConfig documents this list as weight paths ('lm_head.weight', as the
    ISTA-DASLab checkpoints write it), but integrations/aqlm.replace_with_aqlm_linear tests it against module names
    (quantizers_utils.should_convert_module), which 'lm_head.weight' never matches. The output head then becomes an
    AQLM layer with no stored codes, codebooks or scales (left uninitialised) and the model produces NaN. Module
    names are added beside the weight names, so the fix stays harmless once upstream matches weight names.
    """
    fixed = dict(quantization_config)
    names = list(fixed.get("linear_weights_not_to_quantize") or [])
    fixed["linear_weights_not_to_quantize"] = names + [
        n.removesuffix(".weight") for n in names if n.endswith(".weight") and n.removesuffix(".weight") not in names
    ]
    return fixed


_numba_state = threading.local()


def _one_numba_thread(_module, _args) -> None:
    import numba

    _numba_state.previous = numba.get_num_threads()
    if _numba_state.previous != 1:
        numba.set_num_threads(1)


def _restore_numba_threads(_module, _args, _output) -> None:
    import numba

    previous = getattr(_numba_state, "previous", 1)
    if previous != 1:
        numba.set_num_threads(previous)


def guard_cpu_kernel(model: torch.nn.Module) -> int:
    """Make every CPU forward of an 8-bit-codebook AQLM layer run aqlm's numba kernel on exactly one thread.

    Upstream defect (aqlm 1.1.7, inference_kernels/numba_kernel.py): the kernel's `prange` runs over input
    groups while every iteration adds into the same output entries, a data race. With more than one numba thread
    the output changes from run to run and is off by 7-28 % (relative); with one thread it is exact. We keep the
    kernel (it is what aqlm serves on CPU, and tokens/s should be its speed) and pin it to one thread:
    * in this process, by hooks around each such layer (numba's thread count is per calling thread, so the hooks
      hold in whichever thread runs the model: lm-eval, the benchmark);
    * in processes started from this one (the artifact check reloads the model in a fresh interpreter), through
      NUMBA_NUM_THREADS=1 (`_pin_numba_in_child_processes`).
    Returns the number of guarded layers.
    """
    from aqlm import QuantizedLinear

    layers = [
        m
        for m in model.modules()
        if isinstance(m, QuantizedLinear) and m.codebook_size == 256 and m.codebooks.device.type == "cpu"
    ]
    if not layers:
        return 0
    _pin_numba_in_child_processes()
    start_numba_pool()
    for m in layers:
        if not getattr(m, "_quantbench_numba_guard", False):
            m.register_forward_pre_hook(_one_numba_thread)
            m.register_forward_hook(_restore_numba_threads)
            m._quantbench_numba_guard = True
    log.info(
        "aqlm CPU kernel: %d layer(s) with 8-bit codebooks pinned to one numba thread (aqlm 1.1.7's kernel "
        "races with more)",
        len(layers),
    )
    return len(layers)


def start_numba_pool() -> None:
    """Start numba's thread pool now, then give torch back its own thread count.

    numba's OpenMP threading layer sets the process-wide OpenMP thread count to its pool size when the pool starts,
    and torch shares it: started lazily by the first AQLM forward, the pool would silently change how many threads
    every later torch op in this process uses (one, after `_pin_numba_in_child_processes`; for the rest of a
    multirun too).
    """
    import numba

    threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool if it is not running yet
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _pin_numba_in_child_processes() -> bool:
    """Set NUMBA_NUM_THREADS=1 for the processes this one starts, where that is safe; True if it is set.

    numba reads NUMBA_NUM_THREADS when it is imported (the size of its thread pool) and again at every compilation,
    raising once the pool is launched if the variable changed. So it is set only while numba is not imported yet
    (this process's pool is then one thread too, which the kernel needs anyway) or already runs one thread.
    """
    if os.environ.get("NUMBA_NUM_THREADS") == "1":
        return True
    if "numba" in sys.modules:
        import numba

        if numba.config.NUMBA_NUM_THREADS != 1:
            log.warning(
                "numba is already running with %d threads, so processes started from this one (the artifact "
                "check) will run aqlm's racy CPU kernel and may disagree with this one; start Python with "
                "NUMBA_NUM_THREADS=1 to avoid that",
                numba.config.NUMBA_NUM_THREADS,
            )
            return False
    os.environ["NUMBA_NUM_THREADS"] = "1"
    return True
