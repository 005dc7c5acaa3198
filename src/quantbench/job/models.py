"""Resolving a model reference (embedded default, local folder or hub id) and loading it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.paths import EMBEDDED_PREFIX  # noqa: F401  (models.EMBEDDED_PREFIX)
from quantbench.hub import (  # noqa: F401  (models.hub_* for the callers that name them here)
    OFFLINE_MODE,
    HubAccessError,
    cached_snapshot,
    hub_access_problem,
    hub_commit,
    hub_endpoint,
    hub_offline,
    hub_unreachable,
    resolve_hub,
)

log = logging.getLogger(__name__)

# What a model's snapshot must hold to be used from the local Hugging Face cache without the hub.
MODEL_FILES = ("config.json", "*.safetensors", "*.json", "*.model")


@dataclass
class SourceModel:
    """A model that exists: a local folder, or a hub id that is cached or reachable."""

    name: str
    reference: str  # what the user wrote
    path_or_id: str  # what from_pretrained gets
    revision: str | None = None  # for a hub id: the commit the revision asked for resolved to
    trust_remote_code: bool = False
    hub_commit: str | None = None  # a hub id's resolved commit (also when read from a cached snapshot)

    def tags(self) -> dict[str, str]:
        """The hub identity of a model by hub id (repo, resolved commit, endpoint); nothing for a local folder."""
        if self.hub_commit is None:
            return {}
        return {
            "model.hub_id": self.reference,
            "model.hub_commit": self.hub_commit,
            "model.hub_endpoint": hub_endpoint(),
        }

    def local_folder(self) -> str:
        """A folder holding the model's files, for loaders that take no revision (GPTQModel): a hub id's snapshot at
        its resolved commit, downloaded into the Hugging Face cache as from_pretrained does."""
        if self.hub_commit is None or Path(self.path_or_id).is_dir():
            return self.path_or_id
        from huggingface_hub import snapshot_download

        return snapshot_download(self.path_or_id, revision=self.hub_commit)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            self.path_or_id, revision=self.revision, trust_remote_code=self.trust_remote_code
        )

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            self.path_or_id, revision=self.revision, trust_remote_code=self.trust_remote_code
        )

    def load(self, dtype: torch.dtype, device: str, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.path_or_id,
            revision=self.revision,
            dtype=dtype,
            device_map=device,
            trust_remote_code=self.trust_remote_code,
            **kwargs,
        )


def resolve(model_cfg: DictConfig, cache_dir: str | Path) -> SourceModel:
    """Turn `model.pretrained` into a SourceModel, or raise ConfigError without loading any weights."""
    ref = str(model_cfg.pretrained)
    common = dict(
        name=model_cfg.name,
        reference=ref,
        revision=model_cfg.get("revision"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
    )
    if ref.startswith(EMBEDDED_PREFIX):
        return SourceModel(path_or_id=str(embedded_root(ref, cache_dir) / "model"), **common)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"model.pretrained={ref!r}: no such folder. Give an existing local model folder "
                f"(with config.json), a hub id such as 'meta-llama/Llama-3.1-8B-Instruct', "
                f"or 'embedded:tiny' for the built-in model."
            )
        if not (path / "config.json").exists():
            raise ConfigError(
                f"model.pretrained={ref!r}: the folder exists but has no config.json, so it is not "
                f"a Hugging Face model folder."
            )
        check_weight_files(path, f"model.pretrained={ref!r}")
        return SourceModel(path_or_id=str(path.resolve()), **common)
    path_or_id, commit = resolve_hub(ref, model_cfg.get("revision"), "model.pretrained", MODEL_FILES)
    return SourceModel(**(common | {"revision": commit}), path_or_id=path_or_id, hub_commit=commit)


def check_weight_files(folder: Path, what: str) -> None:
    """Refuse a folder whose safetensors files are not whole (a download or copy cut short), before any weights load:
    each file's header is read and checked to cover the file (milliseconds, even for an 8B folder)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ConfigError(
                f"{what}: {file} is not a whole safetensors file ({exc}); it was probably cut short by a download "
                f"or copy. Copy or download the model folder again (for a hub snapshot, delete it from the Hugging "
                f"Face cache first)."
            ) from exc


def embedded_root(ref: str, cache_dir: str | Path) -> Path:
    """The folder of an embedded fixture (model/, and tasks/ for the tiny model), built on first use."""
    from quantbench.embedded import random_shape, tiny

    name = ref.removeprefix(EMBEDDED_PREFIX)
    if name == "tiny":
        return tiny.build(cache_dir=Path(cache_dir) / "quantbench")
    if random_shape.is_shape(name):
        return random_shape.build(name, cache_dir=Path(cache_dir) / "quantbench")
    choices = ["embedded:tiny"] + [f"{EMBEDDED_PREFIX}{s}{random_shape.SUFFIX}" for s in sorted(random_shape.SHAPES)]
    raise ConfigError(f"{ref!r}: unknown embedded model {name!r}; choose one of {choices}.")


def has_random_weights(ref: str) -> bool:
    """True for the random-weight architectures: their speed and size are real, their accuracy is chance."""
    from quantbench.embedded import random_shape

    return ref.startswith(EMBEDDED_PREFIX) and random_shape.is_shape(ref.removeprefix(EMBEDDED_PREFIX))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.isdir(ref) or ref.count("/") > 1
