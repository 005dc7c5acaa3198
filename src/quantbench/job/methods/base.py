"""The interface every method implements, and the helpers most of them share."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.dtypes import torch_dtype  # noqa: F401  (methods import it from here)
from quantbench.job.models import SourceModel
from quantbench.versions import library_version


class Method:
    """Quantize a source model, save it in a serving format, and hand back the in-memory model.

    Subclasses set `library` (the pip distribution doing the work) and `quant_format` (what is on disk), and
    implement `quantize`. The saved folder is the artifact: it is never re-saved after loading, because some
    formats do not survive a save of a loaded model.
    """

    library: str = "transformers"
    quant_format: str = "safetensors"
    needs_calibration: bool = False
    is_baseline: bool = False  # the unquantized reference that quality metrics compare against
    # `load_saved` gives back the saved folder as `quantize` did, so the quantized-model cache may keep it; not where
    # quantizing is loading (fp16, bitsandbytes)
    cacheable: bool = False
    # Integer weights stored with a zero point per group (asymmetric): not every serving kernel takes them.
    zero_points: bool = False
    # A format whose serving kernels need something of the device (bench/backends/vllm.py FORMAT_NEEDS); None: none.
    serving_format: str | None = None
    # The LM head is quantized too (method.quantize_lm_head where a method offers it).
    quantize_lm_head: bool = False
    # SLURM's time limit for one job of this method (hardware.job_time_min=null: schema.slurm_time_min): minutes for
    # one calibration seed of Llama 3.1 8B on one GPU, evaluation (MMLU, ARC) and benchmark included. Estimates with
    # a margin, not measurements: a job that outgrows them says so in SLURM's TIMEOUT; set hardware.job_time_min.
    time_limit_min: int = 90

    @classmethod
    def time_limit_for(cls, knobs: dict) -> int:
        """`time_limit_min` for a method configured with `knobs` (its YAML); a method whose knobs change its cost
        (a published checkpoint instead of quantizing) says so here."""
        return cls.time_limit_min

    @classmethod
    def compute_inputs(cls, knobs: DictConfig, hardware: DictConfig) -> dict:
        """What the artifact depends on beyond the method's config and the hardware config, resolved on this machine
        (AWQ's calibration dtype under `auto`): part of the quantize key."""
        return {}

    def __init__(self, name: str):
        # No catch-all **kwargs: a method's knobs are its subclass's constructor arguments, so Hydra's instantiate
        # refuses one it does not have (`+method.typo=1` included).
        self.name = name

    def validate(self, model_config, hardware: DictConfig) -> None:
        """Raise ConfigError for settings this method cannot honour on this model and hardware. Cheap."""

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        raise NotImplementedError

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module | None:
        """The saved folder loaded as `quantize` hands it back, for a folder taken from the quantized-model cache;
        None where quantizing is loading (fp16, bitsandbytes): such methods are not cached."""
        return None

    def loading_attributes(self) -> dict:
        """Settings a user passes to `from_pretrained` to load the saved folder as this method did (e.g. a kernel);
        the fresh-process artifact check loads with them."""
        return {}

    def layout(self, linear_names: list[str]) -> dict[str, str] | None:
        """Each decoder linear layer's stored format where a method mixes precisions (method.keep); None: uniform."""
        return None

    def tags(self) -> dict[str, str]:
        return {
            "method": self.name,
            "quant_library": self.library,
            "quant_library_version": library_version(self.library),
            "quant_format": self.quant_format,
            "quantize_lm_head": str(bool(self.quantize_lm_head)).lower(),
        }


def linear_kernel(model: torch.nn.Module, linear_names: list[str]) -> str:
    """Which module classes actually run the (formerly nn.Linear) layers, read from the loaded model."""
    modules = dict(model.named_modules())
    kinds = Counter(
        f"{type(modules[n]).__module__}.{type(modules[n]).__qualname__}" for n in linear_names if n in modules
    )
    return ", ".join(f"{k} x{c}" for k, c in kinds.most_common()) or "unknown"
