"""RTN (round to nearest): the uncalibrated baseline every weight-quantization paper compares against.

Each group of `group_size` input weights gets one scale (and a zero point if asymmetric) from its own min and max,
and every weight is rounded to the nearest level: no calibration data, no error feedback. Without it a user cannot
tell what GPTQ's or AWQ's calibration bought. Done by llm-compressor's data-free QuantizationModifier and saved as
compressed-tensors "pack-quantized", the same format AWQ writes, so vLLM serves both with the same kernels.
"""

from __future__ import annotations

from omegaconf import DictConfig

from quantbench.job.methods._preset import PresetScheme
from quantbench.job.methods._weight_only import (
    COMPRESSED_TENSORS_BITS,
    check_bits,
    check_group_size,
    check_keep_bits,
    int_weight_modifier,
    keep_layout,
    keep_patterns,
)


class RTN(PresetScheme):
    """Quantized, saved and reloaded as the preset-scheme methods are (oneshot without a dataset: nothing is
    calibrated), with its own INT weight scheme instead of a preset; the LM head too with `quantize_lm_head`."""

    needs_calibration = False

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        quantize_lm_head: bool = False,
        keep: str = "none",
        keep_bits: int = 16,
    ):
        super().__init__(name, quantize_lm_head)
        self.bits, self.group_size, self.symmetric = int(bits), int(group_size), bool(symmetric)
        self.keep, self.keep_bits = str(keep), int(keep_bits)
        self.keep_targets: list[str] = []  # the patterns of `keep`, once validate knows the number of blocks

    @property
    def zero_points(self) -> bool:
        return not self.symmetric

    def validate(self, model_config, hardware: DictConfig) -> None:
        super().validate(model_config, hardware)
        check_bits("rtn", self.bits, COMPRESSED_TENSORS_BITS, "what vLLM's compressed-tensors kernels serve")
        check_group_size("rtn", self.group_size, model_config)
        check_keep_bits(self.bits, self.keep_bits, COMPRESSED_TENSORS_BITS)
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self.keep_targets = keep_patterns(self.keep, int(text.num_hidden_layers))

    def recipe(self) -> list:
        return [
            int_weight_modifier(
                self.bits, self.group_size, self.symmetric, self.targets, self.ignore, self.keep_targets, self.keep_bits
            )
        ]

    def layout(self, linear_names: list[str]) -> dict[str, str] | None:
        if not self.keep_targets:
            return None
        return keep_layout(linear_names, self.keep_targets, self.bits, self.keep_bits, self.group_size)
