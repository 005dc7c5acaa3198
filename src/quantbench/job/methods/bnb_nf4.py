"""bitsandbytes 4-bit (NF4 + double quantization, as in the seed): quantized while loading, no calibration."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel


class BnbNF4(Method):
    library = "bitsandbytes"
    quant_format = "bitsandbytes-4bit"
    time_limit_min = 120  # bitsandbytes' 4-bit matmuls make evaluation slower than fp16's

    def __init__(self, name: str, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16"):
        super().__init__(name)
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype

    def validate(self, model_config, hardware: DictConfig) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"method.quant_type={self.quant_type!r}: bitsandbytes 4-bit supports 'nf4' or 'fp4'.")
        torch_dtype(self.compute_dtype)

    def quantize(self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration=None):
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype),
        )
        model = source.load(dtype=torch_dtype(hardware.dtype), device=hardware.device, quantization_config=config)
        model.save_pretrained(out_dir)
        return model
