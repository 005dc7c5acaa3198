"""upstream/humming_ops.py on a CUDA GPU with humming-kernels installed (the CUDA lock; `pytest -m gpu`): the first
test fails once humming registers its torch ops at import, the signal to delete the workaround."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from helpers.run_if import run_if

pytestmark = [
    pytest.mark.gpu,
    run_if(cuda=True),
    pytest.mark.skipif(importlib.util.find_spec("humming") is None, reason="humming-kernels is not installed"),
]

HAS_OP = "import torch; print(hasattr(torch.ops.humming, 'launch_kernel'))"


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_humming_still_registers_its_ops_only_when_its_first_kernel_is_built():
    """What vLLM's compile cache met: humming and vLLM's Humming kernel imported, and still no humming ops."""
    imports = "import humming, humming.ops, vllm.model_executor.kernels.linear.mixed_precision.humming; "
    assert _python(imports + HAS_OP) == "False"


def test_registering_first_gives_vllm_the_ops_its_compile_cache_refers_to():
    register = "from quantbench.upstream.humming_ops import register_humming_ops; print(register_humming_ops()); "
    assert _python(register + HAS_OP) == "True"
