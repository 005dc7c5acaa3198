"""NVFP4 weight-only (NVFP4A16): llm-compressor's NVFP4A16 scheme, no calibration.

Weights are FP4 (e2m1) in groups of 16, each group with an FP8 (e4m3) scale under one float32 global scale per
tensor: 4.5 bits per weight; activations stay 16-bit. vLLM serves it on NVIDIA GPUs with its FP4 weight-only kernels
(vLLM 0.32: Marlin FP4 from compute capability 7.5 up, Hopper included; FlashInfer's CuTe-DSL on Blackwell). vLLM's
CPU build has no NVFP4 kernel at all, so on CPU the vLLM backend refuses and bench.backend=hf benchmarks it
(transformers' compressed-tensors forward, which unpacks the FP4 weights to 16-bit on every call).
"""

from __future__ import annotations

from quantbench.job.methods._preset import PresetScheme


class NVFP4(PresetScheme):
    scheme = "NVFP4A16"
    serving_format = "nvfp4_a16"
    needs_calibration = False
    time_limit_min = 60
