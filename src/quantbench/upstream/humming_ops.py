"""humming-kernels registers its torch ops (`torch.ops.humming.launch_kernel`, ...) only when its first kernel is
built, which vLLM does on the first forward. vLLM's torch.compile cache (its AOT-compiled artifact) refers to those
ops, and vLLM loads the artifact before any forward, so every second start of a Humming-served model failed to load
it ("'_OpNamespace' 'humming' object has no attribute 'launch_kernel'", vLLM 0.26.0, humming-kernels 0.1.19, H100,
2026-12-06) and Dynamo traced the model again (9.9 s of a 63.6 s start). Registering the ops first (humming's own
`init_humming_launcher`, which loads its precompiled launcher library on torch >= 2.11) lets the artifact load.
tests/gpu/test_humming_ops.py fails once humming registers its ops at import. QUANTBENCH_HUMMING_OPS_FIRST=0 leaves
the ops to humming, to time a start without the workaround.
"""

import importlib.util
import logging
import os

log = logging.getLogger(__name__)


def register_humming_ops() -> bool:
    """Register humming's torch ops in this process where humming-kernels is installed; whether they are now there."""
    if importlib.util.find_spec("humming") is None or os.environ.get("QUANTBENCH_HUMMING_OPS_FIRST") == "0":
        return False
    try:
        from humming.ops.utils import init_humming_launcher

        init_humming_launcher()
    except Exception as exc:  # noqa: BLE001 - without the ops vLLM compiles again: slower to start, same result
        log.warning("Could not register humming's torch ops before vLLM starts (%s): its compile cache will miss", exc)
        return False
    return True
