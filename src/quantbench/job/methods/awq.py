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

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.upstream.quantizers import llmcompressor_scope
from quantbench.job.methods._weight_only import (
    COMPRESSED_TENSORS_BITS,
    check_bits,
    check_group_size,
    encode,
    int_weight_modifier,
)
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel

log = logging.getLogger(__name__)

CALIBRATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def calibration_dtype(choice: str, hardware: DictConfig) -> str:
    """The dtype AWQ calibrates in. `auto`: the hardware dtype, except bfloat16 on a CPU that emulates it (no
    AVX512_BF16, no AMX), where float32: the grid search runs every calibration sample through each layer once per
    grid point, and emulated bfloat16 made it ~4.5x slower (121 s against 27 s on a 2-core AVX2 VM)."""
    if choice != "auto":
        return choice
    if str(hardware.dtype) == "bfloat16" and str(hardware.device).startswith("cpu"):
        _, flags = measure.cpu_info()
        if not flags & {"avx512_bf16", "amx_bf16"}:
            return "float32"
    return str(hardware.dtype)


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
        calibration_dtype: str = "auto",
    ):
        super().__init__(name)
        self.bits, self.group_size, self.zero_point = int(bits), int(group_size), bool(zero_point)
        self.duo_scaling, self.n_grid, self.seq_len = bool(duo_scaling), int(n_grid), int(seq_len)
        self.calibration_dtype = str(calibration_dtype)
        self.resolved_calibration_dtype: str | None = None

    @classmethod
    def compute_inputs(cls, knobs: DictConfig, hardware: DictConfig) -> dict:
        return {"calibration_dtype": calibration_dtype(str(knobs.get("calibration_dtype", "auto")), hardware)}

    @property
    def zero_points(self) -> bool:
        return self.zero_point

    def validate(self, model_config, hardware: DictConfig) -> None:
        check_bits("awq", self.bits, COMPRESSED_TENSORS_BITS, "what vLLM's compressed-tensors kernels serve")
        check_group_size("awq", self.group_size, model_config)
        if self.n_grid < 3:
            raise ConfigError(f"method.n_grid={self.n_grid}: AWQ's scale search needs at least 3 grid points.")
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ConfigError(
                f"method.calibration_dtype={self.calibration_dtype!r}: use one of {', '.join(CALIBRATION_DTYPES)}."
            )
        self.resolved_calibration_dtype = calibration_dtype(self.calibration_dtype, hardware)
        if self.seq_len < 8:
            raise ConfigError(f"method.seq_len={self.seq_len}: calibration sequences must be at least 8 tokens.")

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        """Calibrate and quantize with llm-compressor's oneshot, save with its compressed save, then hand back the
        saved folder reloaded: evaluation sees exactly the artifact, not llm-compressor's calibration-time model."""
        if not calibration:
            raise ConfigError("awq needs calibration texts; the pipeline passes them when calibration is configured.")
        # Saved in the hardware dtype (bf16 on CPU, fp16/bf16 on GPUs), the dtype the model is served in: scales
        # stored wider would only be cast back down by vLLM. Calibrated in method.calibration_dtype (auto: the same,
        # except float32 on CPUs that emulate bf16).
        dtype = torch_dtype(hardware.dtype)
        calibrate_in = torch_dtype(calibration_dtype(self.calibration_dtype, hardware))
        model = source.load(dtype=calibrate_in, device=hardware.device)
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
            if calibrate_in != dtype:
                log.info("AWQ calibrated in %s; saving in %s", calibrate_in, dtype)
                model.to(dtype)  # save_pretrained writes config.json's dtype from the parameters
            model.save_pretrained(out_dir, save_compressed=True)  # llm-compressor's save: compressed-tensors
        del model
        gc.collect()
        return self.load_saved(out_dir, source, hardware)

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return reload(out_dir, source, torch_dtype(hardware.dtype), hardware.device)

    def tags(self) -> dict[str, str]:
        tags = super().tags()
        if self.resolved_calibration_dtype:  # known once validated on the hardware
            tags["awq_calibration_dtype"] = self.resolved_calibration_dtype
        return tags

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
