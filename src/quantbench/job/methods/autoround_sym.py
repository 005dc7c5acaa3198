"""auto-round (SignRound) symmetric integer weight-only quantization, exported in a format serving engines load.

auto-round tunes each decoder block on calibration text, then packs and saves the model with its own exporter.
The calibration texts always come from quantbench (auto-round's default set is a hub dataset), and the model the
pipeline evaluates is reloaded from the saved folder, so what is scored is exactly what was shipped.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.job.methods._weight_only import check_group_size
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel
from quantbench.upstream.quantizers import (
    auto_round_linear_layout,
    auto_round_state_restored,
    release_auto_round_state,
)

log = logging.getLogger(__name__)

# export format -> the `quant_method` it writes into config.json (what transformers and vLLM dispatch on).
FORMATS: dict[str, str] = {
    "auto_round": "auto-round",
    "auto_gptq": "gptq",
    "llm_compressor": "compressed-tensors",
    "auto_awq": "awq",
}
# Bits each exporter can pack for symmetric integer weights (auto-round 0.15.1, export/formats/backends/*.py:
# auto_round packs sym int through its GPTQ packer, which like llm_compressor takes W2/W3/W4/W8; AWQ is 4-bit only).
FORMAT_BITS: dict[str, tuple[int, ...]] = {
    "auto_round": (2, 3, 4, 8),
    "auto_gptq": (2, 3, 4, 8),
    "llm_compressor": (2, 3, 4, 8),
    "auto_awq": (4,),
}
MIN_SEQLEN = 8


class AutoRoundSym(Method):
    library = "auto-round"
    cacheable = True
    needs_calibration = True
    time_limit_min = 360  # 200 SignRound iterations per decoder block

    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        iters: int = 200,
        seqlen: int = 512,
        nsamples: int = 128,
        export_format: str = "auto_round",
        seed: int = 42,
        torch_compile: bool = False,
    ):
        super().__init__(name)
        self.on_cpu = False  # known once validated on the hardware
        self.bits, self.group_size, self.iters = bits, group_size, iters
        self.seqlen, self.nsamples, self.seed = seqlen, nsamples, seed
        self.export_format, self.torch_compile = str(export_format), bool(torch_compile)
        self.quant_format = FORMATS.get(self.export_format, self.export_format)

    def validate(self, model_config, hardware: DictConfig) -> None:
        self.on_cpu = str(hardware.device) == "cpu"
        if self.export_format not in FORMATS:
            raise ConfigError(
                f"method.export_format={self.export_format!r} is not an export format of {self.name}; "
                f"choose one of {', '.join(FORMATS)}."
            )
        allowed_bits = FORMAT_BITS[self.export_format]
        if not _is_int(self.bits) or self.bits not in allowed_bits:
            raise ConfigError(
                f"method.bits={self.bits!r}: auto-round's {self.export_format} export packs symmetric "
                f"integer weights of {', '.join(map(str, allowed_bits))} bits only; choose one of those."
            )
        check_group_size(self.name, self.group_size, model_config)
        for knob, value, low in (
            ("iters", self.iters, 0),
            ("nsamples", self.nsamples, 1),
            ("seqlen", self.seqlen, MIN_SEQLEN),
        ):
            if not _is_int(value) or value < low:
                raise ConfigError(f"method.{knob}={value!r} must be an integer >= {low}.")
        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos and self.seqlen > max_pos:
            raise ConfigError(
                f"method.seqlen={self.seqlen} exceeds the model's max_position_embeddings={max_pos}; "
                f"choose a seqlen of at most {max_pos}."
            )

    def quantize(self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None):
        if not calibration:
            raise ConfigError(
                "autoround_sym needs calibration texts, and got none; auto-round would otherwise fetch "
                "its default hub dataset. Set a calibration config (e.g. calibration=local)."
            )
        from auto_round import AutoRound
        from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

        dtype = torch_dtype(hardware.dtype)
        tokenizer = source.tokenizer()
        texts, seqlen = self._fit_calibration(calibration, tokenizer)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # auto-round appends "<model name>-w4g128" to the folder it is given: save under a staging folder beside
        # out_dir, then move the files, so the artifact lands in out_dir itself (a rename, same filesystem).
        staging = Path(tempfile.mkdtemp(prefix=".autoround-", dir=out_dir.parent))
        try:
            with auto_round_state_restored():
                config = SignRoundConfig(
                    iters=int(self.iters),
                    bits=int(self.bits),
                    group_size=int(self.group_size),
                    sym=True,
                    data_type="int",
                )
                compressor = AutoRound(
                    source.load(dtype=dtype, device=hardware.device),
                    tokenizer=tokenizer,
                    scheme=f"W{int(self.bits)}A16",
                    alg_configs=config,
                    dataset=texts,
                    seqlen=seqlen,
                    nsamples=len(texts),
                    seed=int(self.seed),
                    device_map=hardware.device,
                    enable_torch_compile=self.torch_compile,
                )
                # quantize_and_save returns (model, folder); the model is not the evaluated one (see _reload)
                folder = compressor.quantize_and_save(str(staging), format=self.export_format)[1]
                del compressor
            _move_contents(Path(folder), out_dir)
        finally:
            release_auto_round_state()
            shutil.rmtree(staging, ignore_errors=True)
        self._check_saved_format(out_dir)
        return self._reload(out_dir, dtype, hardware.device)

    def tags(self) -> dict[str, str]:
        tags = super().tags()
        if self.on_cpu and self.export_format in ("auto_round", "auto_gptq"):  # loaded with auto-round's torch kernel
            tags["auto_round_cpu_matmul"] = "linear_layout"  # quantbench.upstream.quantizers.auto_round_linear_layout
        return tags

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig) -> torch.nn.Module:
        return self._reload(out_dir, torch_dtype(hardware.dtype), hardware.device)

    def _fit_calibration(self, texts: list[str], tokenizer) -> tuple[list[str], int]:
        """Clamp seqlen/nsamples to what the texts hold: auto-round silently skips texts shorter than seqlen and
        calls exit() when none is left, so pick the longest seqlen at which `nsamples` texts still qualify."""
        lengths = [len(tokenizer(t).input_ids) for t in texts]
        nsamples = min(int(self.nsamples), len(texts))
        seqlen = min(int(self.seqlen), sorted(lengths, reverse=True)[nsamples - 1])
        if seqlen < MIN_SEQLEN:
            raise ConfigError(
                f"calibration texts are too short for auto-round: only {seqlen} tokens in the "
                f"{nsamples} longest; raise calibration.seq_len."
            )
        if (seqlen, nsamples) != (self.seqlen, self.nsamples):
            log.warning(
                "auto-round calibration clamped to the texts given: seqlen %s -> %s, nsamples %s -> %s "
                "(raise calibration.seq_len / calibration.num_samples to use the configured values)",
                self.seqlen,
                seqlen,
                self.nsamples,
                nsamples,
            )
        chosen = [t for t, n in zip(texts, lengths) if n >= seqlen][:nsamples]
        return chosen, seqlen

    def _check_saved_format(self, out_dir: Path) -> None:
        """The folder's config.json must carry the quant_method this method reports as quant_format."""
        import json

        written = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
        if written != self.quant_format:
            log.warning(
                "auto-round wrote quant_method=%r for export_format=%r, expected %r",
                written,
                self.export_format,
                self.quant_format,
            )

    def _reload(self, out_dir: Path, dtype: torch.dtype, device: str):
        """The model auto-round leaves behind is not a clean inference model for every format (auto_gptq's raises
        a shape error, llm_compressor's has weightless Linear modules), so evaluate the saved folder, loaded the
        way a user would. Never re-saved: re-saving a loaded GPTQ-format model corrupts it (transformers 5.17)."""
        from transformers import AutoModelForCausalLM

        kwargs = {}
        if self.export_format == "auto_gptq":
            # transformers' own GPTQ loader needs optimum, which is not installed; auto-round's loader reads
            # GPTQ (v1) checkpoints, and transformers routes to it when given an AutoRoundConfig.
            from transformers import AutoRoundConfig

            kwargs["quantization_config"] = AutoRoundConfig()
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map=device, **kwargs)
        model.eval()
        auto_round_linear_layout(model)  # CPU layers only
        return model


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _move_contents(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        target = dst / child.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(child, target)
