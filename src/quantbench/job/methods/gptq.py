"""GPTQ (error-aware INT weights) through GPTQModel, AutoGPTQ's maintained successor.

GPTQ rounds each layer's weights column by column and spreads the rounding error over the columns not yet rounded,
weighted by the calibration inputs' second moments (the Hessian). Saved in the GPTQ format (int32-packed qweight,
qzeros, fp16 scales, g_idx) that vLLM and transformers (with optimum) load.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.upstream.quantizers import gptqmodel_scope
from quantbench.job.methods._weight_only import check_bits, check_group_size, encode
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel

log = logging.getLogger(__name__)

# The widths the GPTQ format packs into int32 words and vLLM's GPTQ kernels serve.
SUPPORTED_BITS = (2, 3, 4, 8)


class GPTQ(Method):
    library = "gptqmodel"
    cacheable = True
    quant_format = "gptq"
    needs_calibration = True
    time_limit_min = 180

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        act_group_aware: bool = True,
        damp_percent: float = 0.05,
        seq_len: int = 128,
        batch_size: int = 1,
        backend: str = "auto",
    ):
        super().__init__(name)
        self.backend = str(backend)
        self.bits, self.group_size, self.sym, self.desc_act = int(bits), int(group_size), bool(sym), bool(desc_act)
        self.act_group_aware, self.damp_percent = bool(act_group_aware), float(damp_percent)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)

    @property
    def zero_points(self) -> bool:
        return not self.sym

    def validate(self, model_config, hardware: DictConfig) -> None:
        check_bits("gptq", self.bits, SUPPORTED_BITS, "the widths the GPTQ format packs")
        check_group_size("gptq", self.group_size, model_config)
        if not 0 < self.damp_percent < 1:
            raise ConfigError(
                f"method.damp_percent={self.damp_percent}: the Hessian dampening must be in (0, 1); "
                f"GPTQ's usual value is 0.01 to 0.1."
            )
        if self.desc_act and self.act_group_aware:
            raise ConfigError(
                "method.desc_act=true cannot be combined with method.act_group_aware=true (GPTQModel "
                "orders columns one way or the other); set method.act_group_aware=false."
            )
        if self.seq_len < 8 or self.batch_size < 1:
            raise ConfigError(
                f"method.seq_len={self.seq_len} and method.batch_size={self.batch_size}: "
                f"need at least 8 tokens per sequence and a batch of at least 1."
            )
        with gptqmodel_scope():
            from gptqmodel import BACKEND

        choices = sorted(b.value for b in BACKEND)
        if self.backend not in choices:
            raise ConfigError(
                f"method.backend={self.backend!r} is not a GPTQModel kernel backend; choose one of "
                f"{choices} (auto: GPTQModel's choice for the device)."
            )
        device = str(hardware.device).split(":")[0]
        devices = kernel_devices(self.backend)
        if devices and "all" not in devices and device not in devices:
            raise ConfigError(
                f"method.backend={self.backend!r}: GPTQModel's kernels for it run on {sorted(devices)}, and "
                f"hardware={hardware.get('name', device)} is {device}; leave method.backend=auto or pick a backend for {device} "
                f"(torch runs everywhere)."
            )

    def loading_attributes(self) -> dict:
        """The kernel choice holds for the fresh-process reload too (transformers' GPTQConfig `backend`): with auto,
        GPTQModel would build Machete there, which downloads CUTLASS: it fails on a machine without network."""
        return {} if self.backend == "auto" else {"backend": self.backend}

    def quantize(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None
    ) -> torch.nn.Module:
        """Quantize and save with GPTQModel's own save before any forward pass of the packed model, then hand back
        the saved folder loaded by GPTQModel: a model saved after such a forward does not reload, and a loaded
        GPTQ model must never be re-saved, so the folder on disk is written exactly once."""
        if not calibration:
            raise ConfigError("gptq needs calibration texts; the pipeline passes them when calibration is configured.")
        # The model runs its calibration forwards in the hardware dtype (bf16 on CPU, where fp16 matmuls are slow);
        # GPTQModel accumulates the Hessian in float32 either way and stores scales as fp16, as the format wants.
        dtype = torch_dtype(hardware.dtype)
        examples = encode(source.tokenizer(), calibration, self.seq_len)
        with gptqmodel_scope(log_dir=out_dir.parent / "gptqmodel_logs"):
            from gptqmodel import GPTQConfig, GPTQModel

            config = GPTQConfig(
                bits=self.bits,
                group_size=self.group_size,
                sym=self.sym,
                desc_act=self.desc_act,
                act_group_aware=self.act_group_aware,
                damp_percent=self.damp_percent,
                offload_to_disk=False,
            )  # the default spills finished layers to a temp dir in /tmp
            qmodel = GPTQModel.load(
                source.local_folder(),  # a hub model's snapshot at its resolved commit: GPTQModel takes no revision
                config,
                dtype=dtype,
                device=hardware.device,
                trust_remote_code=source.trust_remote_code,
            )
            qmodel.quantize(examples, batch_size=self.batch_size)
            qmodel.save(str(out_dir))
            del qmodel
            gc.collect()
            return self.load_saved(out_dir, source, hardware)

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return reload(out_dir, source, torch_dtype(hardware.dtype), hardware.device, self.backend)


def kernel_devices(backend: str) -> set[str]:
    """The device types ("cuda", "cpu", "all", ...) of GPTQModel's GPTQ kernels for `backend` (empty for auto and
    for backends outside GPTQModel's kernels, e.g. vllm): asked of GPTQModel, so a refusal comes before any work."""
    with gptqmodel_scope():
        from gptqmodel import BACKEND
        from gptqmodel.quantization import METHOD
        from gptqmodel.utils.importer import get_kernel_backends, iter_quant_linear_kernels, normalize_backend

    wanted = normalize_backend(BACKEND(backend), quant_method=METHOD.GPTQ)
    return {
        d.value
        for cls in iter_quant_linear_kernels()
        if wanted in get_kernel_backends(cls)
        for d in cls.SUPPORTS_DEVICES
    }


def reload(
    folder: Path, source: SourceModel, dtype: torch.dtype, device: str, backend: str = "auto"
) -> torch.nn.Module:
    """The saved folder through GPTQModel's loader with the kernel `backend` (auto: the fastest for the device); the
    transformers model inside is what lm-eval's HFLM gets. transformers' own GPTQ loader would need optimum as well.

    On Hopper, auto picks Machete, which GPTQModel 7.6 builds on first use against a CUTLASS release it downloads:
    without network (our GPU test machine) that fails, so there `method.backend=marlin`."""
    with gptqmodel_scope():
        from gptqmodel import BACKEND, GPTQModel

        loaded = GPTQModel.load(
            str(folder),
            dtype=dtype,
            device=device,
            backend=BACKEND(backend),
            trust_remote_code=source.trust_remote_code,
        )
    return loaded.model
