"""The installed version of a distribution, on the ground floor: methods tag their library's version and the job key
hashes every library's, without importing MLflow (quantbench.tracking) for it."""

from __future__ import annotations

from importlib import metadata


def library_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
