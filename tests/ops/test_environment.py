"""The pinned environment: every library imports, the installed versions are the locked ones, and the
libraries pip cannot vouch for (vLLM installed with --no-deps) actually work."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import ROOT


def test_every_library_imports():
    out = subprocess.run([sys.executable, "-m", "quantbench.ops.envcheck"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_installed_versions_are_the_locked_versions():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", (ROOT / "requirements-lock.txt").read_text(), re.M))
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, "missing")
            continue
        if installed.split("+")[0] != version.split("+")[0]:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements-lock.txt: {wrong}"


@pytest.mark.parametrize("module", ["torch", "transformers", "lm_eval", "mlflow", "vllm"])
def test_the_installed_libraries_are_compiled_to_bytecode(module):
    """`make install` compiles what it installs (pip does by default, uv when asked): where PYTHONDONTWRITEBYTECODE=1
    (our machines and CI), nothing is compiled later, and every job, reload and test process would compile these
    libraries from source again (about twice the time of each fresh process)."""
    source = importlib.util.find_spec(module).origin
    assert Path(importlib.util.cache_from_source(source)).exists(), f"{module} is not compiled: {source}"


def test_bitsandbytes_nf4_round_trip_on_cpu():
    import bitsandbytes.functional as F

    w = torch.randn(256, 256, dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    back = F.dequantize_4bit(q, state)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert q.numel() * q.element_size() == w.numel() // 2  # 4 bits per weight, packed
    assert 0.01 < rel < 0.2  # lossy, but close


def test_vllm_imports_beside_the_pinned_transformers():
    """vLLM pins transformers<5.20 and compressed-tensors==0.17; we run it beside 5.17 and 0.19 (docs/installation.md: Pins).
    In a child process: importing vLLM changes the importing process (bench/backends/_vllm_engine.py says how), and the
    tests after this one must not run in a process that vLLM has changed."""
    code = (
        "from vllm import LLM, SamplingParams; from importlib import metadata; "
        "print(metadata.version('transformers'), metadata.version('compressed-tensors'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["5.17.0", "0.19.0"]


def test_torchvision_is_absent():
    """With torchvision installed beside the CPU torch, `from vllm import LLM` fails; keep it out."""
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("torchvision")
