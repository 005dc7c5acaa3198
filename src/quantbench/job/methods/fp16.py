"""The unquantized baseline, in the hardware's dtype (the seed's "FP16")."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel


class FP16(Method):
    library = "transformers"
    is_baseline = True

    def quantize(self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration=None):
        self.quant_format = f"safetensors-{hardware.dtype}"
        model = source.load(dtype=torch_dtype(hardware.dtype), device=hardware.device)
        model.save_pretrained(out_dir)
        return model
