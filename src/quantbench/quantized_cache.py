"""A content-addressed cache of quantized models: the same source model, quantized by the same method with the same
calibration and library versions, is quantized once.

Why: GPTQ on an 8B model takes an hour and AQLM most of a day; a sweep that adds an evaluation task or a benchmark
setting must not pay that again. The key is what makes the artifact (the source model's file hashes or hub commit,
the method and calibration configs, the dtype and device type, the quantizing libraries' versions), never where or
when. An entry is the saved folder plus a manifest with the sha256 of each file; a use checks every file against
it, and an entry that changed is dropped, never used. Only artifacts that passed the fresh-process check are stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench import __version__, measure
from quantbench.models import SourceModel
from quantbench.tracking import library_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_LIBRARIES = ("torch", "transformers")
# Weight shards are hard-linked between a job's model folder and the cache, not copied: an 8B study keeps one copy of
# each artifact on disk, not two (a 64 GB disk filled up with copies during the seed study on an H100). Nothing writes
# a shard after it is saved; every other file (configs, the tokenizer the job writes after a restore) is copied, so a
# write to it cannot reach the entry. A shard changed anyway is caught by the manifest's sha256 at the next lookup.
LINKED_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Entry:
    key: str
    folder: Path  # the saved model folder inside the cache
    manifest: dict


def inputs(cfg: DictConfig, method, source: SourceModel) -> dict:
    """Everything the quantized artifact depends on, and nothing about where it is written."""
    out = {
        "source": source_identity(source, Path(cfg.paths.cache)),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "dtype": str(cfg.hardware.dtype),
        "device_type": str(cfg.hardware.device).split(":")[0],
        "libraries": {d: library_version(d) for d in (*KEY_LIBRARIES, method.library)},
        "quantbench": __version__,
    }
    if method.needs_calibration:
        out["calibration"] = OmegaConf.to_container(cfg.calibration, resolve=True)
    return out


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_identity(source: SourceModel, cache_dir: Path) -> dict:
    """A hub snapshot by repo and commit; any other folder by the sha256 of its files (remembered per path, size and
    mtime, so an 8B folder is hashed once, not per job)."""
    if source.hub_commit is not None:  # a hub id: the commit its revision resolved to (downloaded or cached)
        return {"hub": source.reference, "commit": source.hub_commit}
    path = Path(source.path_or_id)
    if not path.is_dir():  # a hub id resolved elsewhere than models.resolve: its revision as asked
        return {"hub": source.path_or_id, "revision": source.revision or "main"}
    if path.parent.name == "snapshots":  # the Hugging Face cache: .../models--org--name/snapshots/<commit>
        return {"hub": source.reference, "commit": path.name}
    memo_path = cache_dir / "quantbench" / "file-sha256.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = f.stat()
        memo_key = f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = measure.sha256(f)
        files[f.relative_to(path).as_posix()] = memo[memo_key]
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(memo_path)
    return {"files": files}


def lookup(cache_dir: Path, key: str) -> Entry | None:
    """The entry for `key` if it is there and every file still has its recorded sha256; a changed entry is removed."""
    root = Path(cache_dir) / key
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    changed = measure.changed_files(root / "model", manifest["files"])
    if changed:
        log.warning(
            "Quantized-model cache entry %s changed since it was stored (%s): removed, quantizing again",
            root,
            ", ".join(changed[:5]),
        )
        shutil.rmtree(root, ignore_errors=True)
        return None
    return Entry(key, root / "model", manifest)


def store(cache_dir: Path, key: str, inputs: dict, model_dir: Path, metrics: dict[str, float], run_id: str) -> Entry:
    """Copy a verified model folder into the cache (atomically: a half-written entry is never seen), with the
    quantization's own measurements (`metrics`: quantize_s, quantize_peak_mem_gb) and the run that made it."""
    root = Path(cache_dir) / key
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_dir) / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(model_dir, tmp / "model")
    manifest = {
        "key": key,
        "inputs": inputs,
        "files": measure.file_sha256(tmp / "model"),
        "metrics": metrics,
        "run_id": run_id,
        "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if root.exists():  # another job stored the same key meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(root)
    log.info("Stored the quantized model in the cache: %s", root)
    return Entry(key, root / "model", manifest)


def restore(entry: Entry, out_dir: Path) -> None:
    """The cached folder as the job's model folder: weight shards hard-linked, the rest copied (the job writes its
    tokenizer there; the entry must not change)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    _link_tree(entry.folder, out_dir)


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link for a weight shard where the file system allows one (same device), else a copy."""
    if src.endswith(LINKED_SUFFIXES):
        try:
            os.link(src, dst)
            return
        except OSError as err:  # another file system, or one without hard links
            log.debug("Copying %s instead of linking it: %s", src, err)
    shutil.copy2(src, dst)
