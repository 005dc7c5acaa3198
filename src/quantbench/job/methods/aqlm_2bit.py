"""AQLM 2-bit: quantized by our own implementation of the paper (`aqlm_quantizer`), or a published AQLM checkpoint
(`pretrained=`), served by transformers' AQLM integration and the `aqlm` kernels.

Both paths end in the same loader (`load_quantized`), which applies two workarounds (in quantbench.upstream.quantizers):
* transformers 5.17 matches `linear_weights_not_to_quantize` against module names while AQLM checkpoints list
  weight names ('lm_head.weight'), so the output head would be replaced by an empty AQLM layer (`fix_not_to_quantize`);
* aqlm 1.1.7's numba CPU kernel for 8-bit codebooks has a data race when numba runs more than one thread
  (`guard_cpu_kernel`).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.job.methods.base import Method, torch_dtype
from quantbench.job.models import SourceModel, resolve_hub
from quantbench.upstream.quantizers import fix_not_to_quantize, guard_cpu_kernel

log = logging.getLogger(__name__)

GROUP = 8  # input weights per code (the paper's and every published checkpoint's in_group_size)
AUTO_MAX_CODEBOOK_BITS = 0.5  # `codebooks: auto` leaves 1x16 when its codebooks would cost more bits per weight
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")


class AQLM2Bit(Method):
    library = "aqlm"
    cacheable = True
    quant_format = "aqlm"
    time_limit_min = 2160  # our AQLM quantizer takes most of a day on an 8B; its kernels make evaluation slow too

    @classmethod
    def time_limit_for(cls, knobs: dict) -> int:
        """A published checkpoint is loaded, not quantized: evaluation with AQLM's kernels is what takes time."""
        return 240 if knobs.get("pretrained") else cls.time_limit_min

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        revision: str | None = None,
        codebooks: str = "auto",
        beam_size: int = 4,
        max_rounds: int = 6,
        rel_tol: float = 0.01,
        kmeans_iters: int = 8,
        cg_iters: int = 16,
        finetune_epochs: int = 4,
        finetune_lr: float = 1e-4,
        batch_size: int = 8,
        seq_len: int = 128,
        seed: int = 0,
        work_dir: str | None = None,
        keep_work: bool = False,
    ):
        super().__init__(name)
        self.pretrained = None if pretrained in (None, "") else str(pretrained)
        self.revision = revision
        self.codebooks = str(codebooks)
        self.search = dict(
            beam_size=int(beam_size),
            max_rounds=int(max_rounds),
            rel_tol=float(rel_tol),
            kmeans_iters=int(kmeans_iters),
            cg_iters=int(cg_iters),
            finetune_epochs=int(finetune_epochs),
            finetune_lr=float(finetune_lr),
            batch_size=int(batch_size),
            seed=int(seed),
        )
        self.seq_len = int(seq_len)
        self.work_dir = work_dir
        self.keep_work = bool(keep_work)
        self.needs_calibration = self.pretrained is None  # a published checkpoint is already quantized
        self.shape: tuple[int, int] | None = None  # (num_codebooks, nbits_per_codebook), settled by validate()
        self.checkpoint: str | None = None  # the resolved `pretrained`: a local folder or a hub id
        self.checkpoint_commit: str | None = None  # a hub checkpoint's resolved commit

    # -- validation: cheap, before any weights load -------------------------------------------------------------

    def validate(self, model_config, hardware: DictConfig) -> None:
        torch_dtype(hardware.dtype)
        if self.pretrained is not None:
            self.checkpoint, self.checkpoint_commit = resolve_checkpoint(self.pretrained, self.revision)
            self.shape = _check_checkpoint(self.checkpoint, self.checkpoint_commit, model_config)
        else:
            shapes = measure.linear_shapes_of_config(model_config)
            bad = sorted(n for n, (_, i) in shapes.items() if i % GROUP)
            if bad:
                raise ConfigError(
                    f"method={self.name}: AQLM codes groups of {GROUP} input weights, and these layers' "
                    f"input sizes are not multiples of {GROUP}: {bad[:5]}."
                )
            lowest = {"beam_size": 1, "batch_size": 1, "max_rounds": 1, "cg_iters": 1, "kmeans_iters": 0,
                      "finetune_epochs": 0, "rel_tol": 0, "seed": 0}  # fmt: skip
            bad = [
                f"method.{k}={self.search[k]} (must be >= {low})" for k, low in lowest.items() if self.search[k] < low
            ]
            if not self.search["finetune_lr"] > 0:  # a negative rate climbs the error; NaN fails this test too
                bad.append(f"method.finetune_lr={self.search['finetune_lr']} (must be > 0)")
            if self.seq_len < 2:
                bad.append(f"method.seq_len={self.seq_len} (must be >= 2)")
            if bad:
                raise ConfigError(f"method={self.name}: " + "; ".join(bad) + ".")
            self.shape = choose_shape(self.codebooks, shapes)
        self.quant_format = f"aqlm-{self.shape[0]}x{self.shape[1]}"
        if self.shape[1] == 8 and str(hardware.device) == "cpu":
            log.info(
                "AQLM %s on CPU: aqlm's numba kernel runs in float32 and, to stay exact, on one numba thread",
                self.quant_format,
            )

    # -- quantize: save the artifact, return the model ---------------------------------------------------------

    def quantize(self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str] | None = None):
        out_dir = Path(out_dir)
        if self.shape is None:
            self.validate(source.config(), hardware)
        if self.pretrained is not None:
            copy_checkpoint(self.checkpoint, self.checkpoint_commit, out_dir)
        else:
            if not calibration:
                raise ConfigError(f"method={self.name} quantizes with calibration data, and none was given.")
            self._quantize_builtin(source, out_dir, hardware, calibration)
        log_bits_per_weight(out_dir, source.config())
        return load_quantized(out_dir, hardware)

    def tags(self) -> dict[str, str]:
        if self.checkpoint_commit is None:
            return super().tags()
        return super().tags() | {"method.hub_id": str(self.pretrained), "method.hub_commit": self.checkpoint_commit}

    def load_saved(self, out_dir: Path, source: SourceModel, hardware: DictConfig):
        return load_quantized(out_dir, hardware)

    def _quantize_builtin(
        self, source: SourceModel, out_dir: Path, hardware: DictConfig, calibration: list[str]
    ) -> None:
        from quantbench.job.methods import aqlm_quantizer as aq

        settings = aq.AQSettings(
            num_codebooks=self.shape[0], nbits_per_codebook=self.shape[1], in_group_size=GROUP, **self.search
        )
        work = Path(self.work_dir) if self.work_dir else out_dir.parent / f"{out_dir.name}.aqlm-work"
        dtype = torch_dtype(hardware.dtype)
        # The model stays on the CPU; quantize_model moves one decoder layer at a time to the compute device.
        model = source.load(dtype=dtype, device="cpu")
        errors = aq.quantize_model(
            model,
            source.tokenizer(),
            calibration,
            settings,
            self.seq_len,
            hardware.device,
            work,
            f"{source.path_or_id}@{source.hub_commit}" if source.hub_commit else source.path_or_id,
        )
        log.info(
            "AQLM %s: mean relative weighted error %.4f over %d linear layers (worst %s %.4f)",
            self.quant_format,
            sum(errors.values()) / len(errors),
            len(errors),
            *max(errors.items(), key=lambda kv: kv[1]),
        )
        # Saved straight from the quantizer's tensors, before any aqlm kernel has run (the first CPU forward of an
        # 8-bit-codebook layer transposes its codes in place; a model saved after it holds codes in the wrong layout).
        aq.write_checkpoint(model, settings, out_dir, weights_dtype=dtype)
        del model
        gc.collect()
        if not self.keep_work:
            shutil.rmtree(work, ignore_errors=True)


# -- codebook shape ------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(text))
    if not match or not (1 <= int(match[1]) <= 8 and 1 <= int(match[2]) <= 16):
        raise ConfigError(
            f"method.codebooks={text!r}: give 'auto' or '<num_codebooks>x<bits per codebook>' such as "
            f"'1x16' (the seed's) or '2x8', with 1-8 codebooks of 1-16 bits."
        )
    return int(match[1]), int(match[2])


def codebook_bits_per_weight(shape: tuple[int, int], linear_shapes: dict[str, tuple[int, int]]) -> float:
    """What the (float16) codebooks add to the bits per weight of the model's linear layers: one set per layer."""
    m, b = shape
    per_layer = m * 2**b * GROUP * 16
    return len(linear_shapes) * per_layer / sum(o * i for o, i in linear_shapes.values())


def choose_shape(codebooks: str, linear_shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """'auto': the seed's 1x16 unless its codebooks would add more than AUTO_MAX_CODEBOOK_BITS per weight (then 2x8).

    Both spend 16 bits of codes per 8 weights. On Llama 3.1 8B 1x16's codebooks add 0.27 bits per weight; on the
    embedded tiny model they would add 69 (a 2^16 x 8 codebook holds 8x more values than a 256x256 layer has
    weights): a lookup table, not a quantizer. 2x8's add 0.54 there.
    """
    if codebooks.strip().lower() != "auto":
        return parse_shape(codebooks)
    extra = codebook_bits_per_weight((1, 16), linear_shapes)
    if extra <= AUTO_MAX_CODEBOOK_BITS:
        return 1, 16
    log.info(
        "method.codebooks=auto: 1x16 codebooks would add %.2f bits per weight on this model's layers; using 2x8 "
        "(adds %.2f)",
        extra,
        codebook_bits_per_weight((2, 8), linear_shapes),
    )
    return 2, 8


# -- published checkpoints -----------------------------------------------------------------------------------------


def resolve_checkpoint(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """(a local folder with config.json, None), or for a hub id (what from_pretrained gets, its resolved commit) once
    the hub has shown it can be read, or its cached snapshot where the hub cannot be used; else ConfigError (no
    download)."""
    if ref.startswith(("/", "./", "../", "~")) or os.path.isdir(ref) or ref.count("/") > 1:
        path = Path(ref).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"method.pretrained={ref!r}: no AQLM checkpoint there (need a folder with config.json), "
                f"or give a hub id such as 'ISTA-DASLab/Meta-Llama-3.1-8B-Instruct-AQLM-PV-2Bit-1x16-hf'."
            )
        return str(path.resolve()), None
    return resolve_hub(ref, revision, "method.pretrained", CHECKPOINT_FILES)


def _checkpoint_config(checkpoint: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(checkpoint, revision=revision)
    except Exception as exc:
        raise ConfigError(f"method.pretrained={checkpoint!r}: cannot read its config.json: {exc}") from exc


def _check_checkpoint(checkpoint: str, revision: str | None, model_config) -> tuple[int, int]:
    """It must be an AQLM checkpoint of the model named in `model` (same architecture), since the pipeline takes the
    tokenizer and the layer shapes for bits per weight from `model`."""
    config = _checkpoint_config(checkpoint, revision)
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if str(qc.get("quant_method", "")).lower() != "aqlm":
        raise ConfigError(
            f"method.pretrained={checkpoint!r} is not an AQLM checkpoint (quantization_config."
            f"quant_method={qc.get('quant_method')!r})."
        )
    diffs = [
        f"{k}: {getattr(config, k, None)} vs {getattr(model_config, k, None)}"
        for k in ARCHITECTURE_KEYS
        if getattr(config, k, None) != getattr(model_config, k, None)
    ]
    if diffs:
        raise ConfigError(
            f"method.pretrained={checkpoint!r} is not a quantization of model.pretrained (checkpoint vs "
            f"model: {'; '.join(diffs)}). Point model= at the model it was quantized from."
        )
    return int(qc.get("num_codebooks", 1)), int(qc.get("nbits_per_codebook", 16))


def copy_checkpoint(checkpoint: str, revision: str | None, out_dir: Path) -> None:
    """The artifact is the published files themselves (never a re-save of the loaded model), with the skip list of
    config.json repaired so that plain transformers reloads it correctly too."""
    import json

    if not Path(checkpoint).is_dir():
        from huggingface_hub import snapshot_download

        checkpoint = snapshot_download(checkpoint, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(checkpoint)
    for pattern in CHECKPOINT_FILES:
        for f in src.glob(pattern):
            shutil.copyfile(f, out_dir / f.name)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = fix_not_to_quantize(config["quantization_config"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- loading, and the CPU kernel guard -------------------------------------------------------------------------------


def load_quantized(model_dir: str | Path, hardware: DictConfig):
    """An AQLM checkpoint through transformers' AQLM integration, ready for lm-eval; both paths end here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    qc = config.quantization_config
    config.quantization_config = fix_not_to_quantize(qc if isinstance(qc, dict) else qc.to_dict())
    device = str(hardware.device)
    # aqlm's CPU kernels are float32 kernels (the numba one refuses float16/bfloat16).
    dtype = torch.float32 if device == "cpu" else torch_dtype(hardware.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, device_map=device)
    model.eval()
    guard_cpu_kernel(model)
    return model


# -- bits per weight, with and without codebooks -----------------------------------------------------------------------


def bits_per_weight_parts(model_dir: str | Path, linear_shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Stored bits per weight of the quantizable layers, split by tensor kind; 'total' is measure.bits_per_weight."""
    index = measure.safetensors_index(model_dir)
    n = sum(o * i for o, i in linear_shapes.values())
    parts = {"codes": 0.0, "codebooks": 0.0, "scales": 0.0, "other": 0.0}
    for prefix in linear_shapes:
        for name, (_, _, nbytes) in index.items():
            if name.startswith(prefix + "."):
                kind = name.rsplit(".", 1)[1]
                parts[kind if kind in parts else "other"] += 8 * nbytes / n
    parts["total"] = sum(parts.values())
    parts["without_codebooks"] = parts["total"] - parts["codebooks"]
    return parts


def log_bits_per_weight(model_dir: Path, model_config) -> dict[str, float]:
    parts = bits_per_weight_parts(model_dir, measure.linear_shapes_of_config(model_config))
    log.info(
        "AQLM bits per weight: %.3f with codebooks (logged as bits_per_weight), %.3f without (codes %.3f, "
        "scales %.3f, codebooks %.3f)",
        parts["total"],
        parts["without_codebooks"],
        parts["codes"],
        parts["scales"],
        parts["codebooks"],
    )
    return parts
