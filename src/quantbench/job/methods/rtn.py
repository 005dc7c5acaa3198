"""RTN (round to nearest): the uncalibrated baseline every weight-quantization paper compares against.

Each group of `group_size` input weights gets one scale (and a zero point if asymmetric) from its own min and max,
and every weight is rounded to the nearest level: no calibration data, no error feedback. Without it a user cannot
tell what GPTQ's or AWQ's calibration bought. Done by llm-compressor's data-free QuantizationModifier and saved as
compressed-tensors "pack-quantized", the same format AWQ writes, so vLLM serves both with the same kernels.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.upstream.quantizers import llmcompressor_scope
from quantbench.job.methods._weight_only import check_bits, check_group_size, int_weight_modifier
from quantbench.job.methods.awq import SUPPORTED_BITS, reload
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel


class RTN(Method):
    library = "llmcompressor"
    cacheable = True
    quant_format = "compressed-tensors"
    needs_calibration = False

    def __init__(self, name: str, bits: int = 4, group_size: int = 128, symmetric: bool = True):
        super().__init__(name)
        self.bits, self.group_size, self.symmetric = int(bits), int(group_size), bool(symmetric)

    @property
    def zero_points(self) -> bool:
        return not self.symmetric

    def validate(self, model_config, hardware: DictConfig) -> None:
        check_bits("rtn", self.bits, SUPPORTED_BITS, "what vLLM's compressed-tensors kernels serve")
        check_group_size("rtn", self.group_size, model_config)

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        """Round every Linear but the LM head with llm-compressor's oneshot (no dataset: nothing is calibrated),
        save compressed, and hand back the saved folder reloaded, as AWQ does."""
        dtype = torch_dtype(hardware.dtype)
        model = source.load(dtype=dtype, device=hardware.device)
        with llmcompressor_scope():
            from llmcompressor import oneshot

            oneshot(model=model, recipe=[int_weight_modifier(self.bits, self.group_size, self.symmetric)])
            model.save_pretrained(out_dir, save_compressed=True)
        del model
        gc.collect()
        return self.load_saved(out_dir, source, hardware)

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return reload(out_dir, source, torch_dtype(hardware.dtype), hardware.device)
