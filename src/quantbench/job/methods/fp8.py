"""FP8 W8A8, dynamic: llm-compressor's FP8_DYNAMIC scheme, no calibration.

Weights are cast to FP8 (e4m3) with one scale per output channel; activations get one FP8 scale per token, computed
on the fly at inference, so nothing is calibrated. vLLM serves it with FP8 GEMMs on GPUs of compute capability 8.9
and above (Ada, Hopper); below that its compressed-tensors loader would silently serve the weights only (W8A16
Marlin), so the vLLM backend refuses there (bench/backends/vllm.py FORMAT_NEEDS).
"""

from __future__ import annotations

from quantbench.job.methods._preset import PresetScheme


class FP8(PresetScheme):
    scheme = "FP8_DYNAMIC"
    serving_format = "fp8_w8a8"
    needs_calibration = False
    time_limit_min = 60
