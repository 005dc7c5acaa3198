"""The Hugging Face hub as quantbench reaches it (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE): is it reachable, what commit
a revision is, whether this user may read a repository, and the cached snapshot when it cannot be reached. Every
problem becomes one ConfigError paragraph before any download (docs/local-hub.md)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from quantbench.errors import ConfigError

log = logging.getLogger(__name__)

OFFLINE_MODE = "HF_HUB_OFFLINE is set (offline mode)"
PROBE_TIMEOUT_S = 3  # a hub that takes longer to accept a connection counts as unreachable


def hub_endpoint() -> str:
    """The hub the clients talk to: HF_ENDPOINT, else https://huggingface.co (as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now (HF_HUB_OFFLINE is set, or its endpoint accepts no connection within
    PROBE_TIMEOUT_S), or None when it can. Probes the endpoint the clients will use, not huggingface.co."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or any(_true(os.environ.get(v)) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return OFFLINE_MODE
    endpoint = urlsplit(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return None
    except OSError as exc:
        return f"{hub_endpoint()} does not answer ({exc.strerror or type(exc).__name__})"


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the hub cannot be used (see hub_unreachable)."""
    return hub_unreachable() is not None


class HubAccessError(Exception):
    """Why a reachable hub will not give a repository, in words a user can act on."""


def hub_commit(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    """The commit `revision` (None: the default branch) of `repo_id` resolves to, once the repository is known to be
    readable with the credentials at hand: the hub shows a gated repository's metadata to anyone and refuses only its
    files, so a gated one is asked `auth-check` too. Raises HubAccessError with the causes told apart (each has another
    fix): gated, no such repository (or private and invisible to the token), no such revision, a refused credential,
    the hub unreachable after all. Asks for metadata only; downloads nothing."""
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
    api = HfApi()
    try:
        info = api.repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=10)
        if info.gated:
            api.auth_check(repo_id, repo_type=repo_type)
        return str(info.sha)
    except HFValidationError as exc:
        raise HubAccessError(f"{repo_id!r} is not a valid hub id ({exc})") from exc
    except GatedRepoError as exc:
        raise HubAccessError(
            f"the {what} {repo_id!r} is gated: accept its licence on its page ({hub_endpoint()}/"
            f"{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}) and log in with an account that has access "
            f"(`hf auth login`, formerly `huggingface-cli login`; or set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubAccessError(
            f"the {what} {repo_id!r} has no revision {revision!r}: give a branch, tag or commit sha it has"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubAccessError(
            f"there is no {what} {repo_id!r} on the hub ({hub_endpoint()}), or it is private and your token cannot see "
            f"it: check the id, and log in for a private one"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise HubAccessError(
                f"the hub refused the credential for {repo_id!r} (HTTP {status}): the token in HF_TOKEN or from "
                f"`hf auth login` is invalid or lacks access; log in again or unset HF_TOKEN"
            ) from exc
        raise HubAccessError(f"the hub answered HTTP {status} for {repo_id!r}: {str(exc).splitlines()[0]}") from exc
    except (httpx.TransportError, OSError) as exc:
        raise HubAccessError(f"the hub cannot be reached for {repo_id!r} ({type(exc).__name__}: {exc})") from exc


def hub_access_problem(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """Why `repo_id` cannot be used from a reachable hub (see hub_commit), or None when it can."""
    try:
        hub_commit(repo_id, revision, repo_type)
        return None
    except HubAccessError as exc:
        return str(exc)


def cached_snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> str | None:
    """The local Hugging Face cache's snapshot of `repo_id` at `revision` with the files `patterns` name, or None; one
    without weights (a download that stopped after config.json) is none."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=list(patterns))
    except (OSError, ValueError):  # not (fully) cached (LocalEntryNotFoundError), or not a valid id (told later)
        return None
    weights = [*Path(folder).glob("*.safetensors"), *Path(folder).glob("*.bin")]
    return folder if (Path(folder) / "config.json").is_file() and weights else None


def _remember_revision(repo_id: str, revision: str | None, key: str) -> None:
    """config.json by the revision asked for, as from_pretrained(repo_id) reads it first: the Hugging Face cache then
    maps that revision to its commit (refs/main), so HF_HUB_OFFLINE=1 finds the snapshot later, though the weights
    are downloaded by the commit itself."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        hf_hub_download(repo_id, "config.json", revision=revision)
    except RemoteEntryNotFoundError as exc:
        raise ConfigError(
            f"{key}={repo_id!r} has no config.json at revision {revision!r}: not a transformers model."
        ) from exc


def resolve_hub(repo_id: str, revision: str | None, key: str, patterns: tuple[str, ...]) -> tuple[str, str]:
    """(what from_pretrained gets, the commit) for the hub id `repo_id` named by the config key `key`, or ConfigError
    before any download. Reachable hub: the revision is resolved there and access checked (a cached copy does not hide
    a gated repository or a wrong revision), and transformers downloads through the Hugging Face cache as a user's
    from_pretrained would. HF_HUB_OFFLINE or an unreachable hub: the cached snapshot, if there is one."""
    why = hub_unreachable()
    if why is None:
        try:
            commit = hub_commit(repo_id, revision)
        except HubAccessError as exc:
            raise ConfigError(f"{key}={repo_id!r}: {exc}.") from exc
        _remember_revision(repo_id, revision, key)
        return repo_id, commit
    cached = cached_snapshot(repo_id, revision, patterns)
    at = f" at revision {revision!r}" if revision else ""
    if cached is not None:
        log.warning("%s=%r: the hub cannot be used (%s): using the cached snapshot %s", key, repo_id, why, cached)
        return cached, Path(cached).name
    if why == OFFLINE_MODE:
        raise ConfigError(
            f"{key}={repo_id!r} is a hub id, {OFFLINE_MODE}, and it is not in the local Hugging Face cache{at}. "
            f"Unset HF_HUB_OFFLINE to download it from {hub_endpoint()}, download it first "
            f"(`hf download {repo_id}`), or point {key} at a local folder."
        )
    raise ConfigError(
        f"{key}={repo_id!r} is a hub id, the hub cannot be reached ({why}; HF_ENDPOINT sets where it is), and it is "
        f"not in the local Hugging Face cache{at}. Use a local copy: point {key} at a local folder, or download it "
        f"where the hub is reachable (`hf download {repo_id}`) into this machine's Hugging Face cache "
        f"(HF_HOME) and run with HF_HUB_OFFLINE=1."
    )
