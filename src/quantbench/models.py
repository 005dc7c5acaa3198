"""Resolving a model reference (embedded default, local folder or hub id) and loading it."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
HUB_HOST = ("huggingface.co", 443)


@dataclass
class SourceModel:
    """A model that exists: a local folder, or a hub id that is cached or reachable."""

    name: str
    reference: str  # what the user wrote
    path_or_id: str  # what from_pretrained gets
    revision: str | None = None
    trust_remote_code: bool = False

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
        return SourceModel(path_or_id=str(path.resolve()), **common)
    return SourceModel(path_or_id=_resolve_hub_id(ref, model_cfg.get("revision")), **common)


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


def hub_offline() -> bool:
    """True when the hub cannot be used: HF_HUB_OFFLINE is set or huggingface.co is unreachable (3 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        return False
    except OSError:
        return True


def hub_access_problem(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """Why `repo_id` cannot be used from a reachable hub, with the causes told apart (each has another fix): gated,
    no such repository (or private and invisible to the token), no such revision, a refused credential, the hub
    unreachable after all. None when it can be used. Asks for metadata only; downloads nothing."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = "model" if repo_type == "model" else repo_type
    try:
        HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=10)
        return None
    except HFValidationError as exc:
        return f"{repo_id!r} is not a valid hub id ({exc})"
    except GatedRepoError:
        return (
            f"the {what} {repo_id!r} is gated: accept its licence on its hub page and log in with an account that "
            f"has access (`huggingface-cli login`, or HF_TOKEN)"
        )
    except RevisionNotFoundError:
        return f"the {what} {repo_id!r} has no revision {revision!r}"
    except RepositoryNotFoundError:
        return (
            f"there is no {what} {repo_id!r} on the hub, or it is private and your token cannot see it: check the "
            f"id, and log in for a private one"
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            return (
                f"the hub refused the credential for {repo_id!r} (HTTP {status}): the token in HF_TOKEN or from "
                f"`huggingface-cli login` is invalid or lacks access"
            )
        return f"the hub answered HTTP {status} for {repo_id!r}: {str(exc).splitlines()[0]}"
    except (httpx.TransportError, OSError) as exc:
        return f"the hub cannot be reached for {repo_id!r} ({type(exc).__name__}: {exc})"


def _resolve_hub_id(repo_id: str, revision: str | None) -> str:
    """A hub id resolves to its cached snapshot when there is one; otherwise the hub must be reachable."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=True,
            allow_patterns=["config.json", "*.safetensors", "*.json", "*.model"],
        )
    except (OSError, ValueError):  # not (fully) cached (LocalEntryNotFoundError), or not a valid id (told below)
        pass
    if hub_offline():
        raise ConfigError(
            f"model.pretrained={repo_id!r} is a hub id, it is not in the local Hugging Face cache, and "
            f"the hub cannot be reached (offline or HF_HUB_OFFLINE=1). Download it first "
            f"(`huggingface-cli download {repo_id}`) or point model.pretrained at a local folder."
        )
    problem = hub_access_problem(repo_id, revision)
    if problem:
        raise ConfigError(f"model.pretrained={repo_id!r}: {problem}.")
    return repo_id
