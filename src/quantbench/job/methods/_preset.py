"""What the methods built on one of llm-compressor's preset schemes share (fp8, w8a8_int8, nvfp4; rtn too, with its
own INT weight scheme): the recipe's targets and ignore list (the LM head in or out), the optional calibration, the
compressed save, the reload.

A preset scheme is compressed-tensors' own name for a format (FP8_DYNAMIC, W8A8, NVFP4A16): the saved config then
says exactly what vLLM's compressed-tensors loader matches against its kernels. Transformers runs the saved folder
compressed (compressed-tensors' forward quantizes activations as the scheme says), so evaluation sees the format.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.job.methods._weight_only import encode
from quantbench.job.methods.awq import reload
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel
from quantbench.upstream.quantizers import llmcompressor_scope


class PresetScheme(Method):
    """A compressed-tensors preset scheme applied by llm-compressor's oneshot to every Linear layer (the LM head
    too with `quantize_lm_head`), saved compressed and reloaded by transformers."""

    library = "llmcompressor"
    cacheable = True
    quant_format = "compressed-tensors"
    scheme: str = ""  # compressed_tensors.quantization.PRESET_SCHEMES key

    def __init__(self, name: str, quantize_lm_head: bool = False):
        super().__init__(name)
        self.quantize_lm_head = bool(quantize_lm_head)

    @property
    def ignore(self) -> list[str]:
        return [] if self.quantize_lm_head else ["lm_head"]

    @property
    def targets(self) -> list[str]:
        """Every Linear, and the head by name where it is quantized: vLLM's compressed-tensors loader matches its
        ParallelLMHead (no Linear class) by layer name only, so a head matched as "Linear" alone is loaded as an
        unquantized embedding and its scales are refused ("no parameter named 'lm_head.weight_scale'")."""
        return ["Linear", "lm_head"] if self.quantize_lm_head else ["Linear"]

    def validate(self, model_config, hardware: DictConfig) -> None:
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        if self.quantize_lm_head and getattr(cfg, "tie_word_embeddings", False):
            raise ConfigError(
                "method.quantize_lm_head=true: this model ties its LM head to the input embeddings "
                "(tie_word_embeddings=true), so quantizing the head would quantize the embedding table too: one "
                "tensor read as a lookup table and as a matmul, which vLLM ties back to the 16-bit embeddings (or, "
                "for INT weight-only schemes, serves as a quantized embedding) and quantbench does not measure; use "
                "method.quantize_lm_head=false for this model."
            )

    def recipe(self) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(targets=self.targets, scheme=self.scheme, ignore=self.ignore)]

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        """oneshot with `recipe()` (with the calibration texts where the method needs them), llm-compressor's
        compressed save, then the saved folder reloaded, as AWQ does: evaluation sees exactly the artifact."""
        if self.needs_calibration and not calibration:
            raise ConfigError(
                f"{self.name} needs calibration texts; the pipeline passes them when calibration is configured."
            )
        model = source.load(dtype=torch_dtype(hardware.dtype), device=hardware.device)
        with llmcompressor_scope():
            from llmcompressor import oneshot

            kwargs = {}
            if self.needs_calibration:
                from datasets import Dataset

                data = Dataset.from_list(encode(source.tokenizer(), calibration, self.seq_len))
                # no shuffling: the texts are a seeded draw already (see awq.py)
                kwargs = dict(
                    processor=source.tokenizer(),
                    dataset=data,
                    num_calibration_samples=len(data),
                    max_seq_length=self.seq_len,
                    shuffle_calibration_samples=False,
                )
            oneshot(model=model, recipe=self.recipe(), **kwargs)
            model.save_pretrained(out_dir, save_compressed=True)
        del model
        gc.collect()
        return self.load_saved(out_dir, source, hardware)

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return reload(out_dir, source, torch_dtype(hardware.dtype), hardware.device)

    def tags(self) -> dict[str, str]:
        return super().tags() | ({"quant_scheme": self.scheme} if self.scheme else {})
