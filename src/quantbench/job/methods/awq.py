"""AWQ (activation-aware weight quantization) through llm-compressor, AutoAWQ's maintained successor.

AWQ scales the weight channels that see large activations before rounding them to INT4 with a zero point per
group (the seed's W4A16 asymmetric, group 128). The result is saved in compressed-tensors "pack-quantized" format,
which vLLM serves with its WNA16 kernels and transformers loads.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.upstream.quantizers import llmcompressor_scope
from quantbench.job.methods._weight_only import check_bits, check_group_size, encode, int_weight_modifier
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel

log = logging.getLogger(__name__)

# compressed-tensors packs 1..8 bits, but vLLM's compressed-tensors WNA16 kernels serve only 4 and 8.
SUPPORTED_BITS = (4, 8)


class AWQ(Method):
    library = "llmcompressor"
    cacheable = True
    quant_format = "compressed-tensors"
    needs_calibration = True
    time_limit_min = 180

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        duo_scaling: bool = True,
        n_grid: int = 20,
        seq_len: int = 128,
    ):
        super().__init__(name)
        self.bits, self.group_size, self.zero_point = int(bits), int(group_size), bool(zero_point)
        self.duo_scaling, self.n_grid, self.seq_len = bool(duo_scaling), int(n_grid), int(seq_len)

    @property
    def zero_points(self) -> bool:
        return self.zero_point

    def validate(self, model_config, hardware: DictConfig) -> None:
        check_bits("awq", self.bits, SUPPORTED_BITS, "what vLLM's compressed-tensors kernels serve")
        check_group_size("awq", self.group_size, model_config)
        if self.n_grid < 3:
            raise ConfigError(f"method.n_grid={self.n_grid}: AWQ's scale search needs at least 3 grid points.")
        if self.seq_len < 8:
            raise ConfigError(f"method.seq_len={self.seq_len}: calibration sequences must be at least 8 tokens.")

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        """Calibrate and quantize with llm-compressor's oneshot, save with its compressed save, then hand back the
        saved folder reloaded: evaluation sees exactly the artifact, not llm-compressor's calibration-time model."""
        if not calibration:
            raise ConfigError("awq needs calibration texts; the pipeline passes them when calibration is configured.")
        # The hardware dtype (bf16 on CPU, fp16/bf16 on GPUs) for calibration and for the saved scales: it is the
        # dtype the model is served in; bf16 runs AWQ's grid search fine on CPU, where fp16 matmuls are slow, and
        # float32 would only store wider scales that vLLM casts back down.
        dtype = torch_dtype(hardware.dtype)
        model = source.load(dtype=dtype, device=hardware.device)
        tokenizer = source.tokenizer()
        with llmcompressor_scope():
            from datasets import Dataset
            from llmcompressor import oneshot

            data = Dataset.from_list(encode(tokenizer, calibration, self.seq_len))
            # No shuffling: the texts are already a seeded draw, and llm-compressor's shuffle draws from torch's
            # global RNG, which made two runs on the same texts differ (and moved the RNG of later jobs).
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=data,
                recipe=self.recipe(),
                num_calibration_samples=len(data),
                max_seq_length=self.seq_len,
                shuffle_calibration_samples=False,
            )
            model.save_pretrained(out_dir, save_compressed=True)  # llm-compressor's save: compressed-tensors
        del model
        gc.collect()
        return self.load_saved(out_dir, source, hardware)

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return reload(out_dir, source, torch_dtype(hardware.dtype), hardware.device)

    def recipe(self) -> list:
        """AWQ smoothing, then the weight-only INT quantization it was smoothing for (lm_head stays 16-bit)."""
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(duo_scaling=self.duo_scaling, n_grid=self.n_grid),
            int_weight_modifier(self.bits, self.group_size, symmetric=not self.zero_point),
        ]


def reload(folder: Path, source: SourceModel, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The saved compressed-tensors folder, loaded as a user would (transformers decompresses it on CPU)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device, trust_remote_code=source.trust_remote_code
    )
