"""A content-addressed cache of quantized models: the same source model, quantized by the same method with the same
calibration, library versions and quantbench source, is quantized once.

Why: GPTQ on an 8B model takes an hour and AQLM most of a day; a sweep that adds an evaluation task or a benchmark
setting must not pay that again. The key is the quantize stage's identity (quantbench.job.identity: the source model's
file hashes or hub commit, the method and calibration configs and data, dtype, device type, library versions,
quantbench's source), never where or when. An entry is the saved folder plus a manifest with the sha256 of each
file; a use checks every file against it, and an entry that changed is dropped, never used. Only artifacts that
passed the fresh-process check are stored.

Jobs share the cache: an entry is published by a rename under a per-key lock (a reader sees all of it or none), a
killed store's temporary folder is removed once its process is gone, and a store that fails (a full disk) leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantbench import atomic, measure

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Weight shards are hard-linked between a job's model folder and the cache, not copied: an 8B study keeps one copy of
# each artifact on disk, not two (a 64 GB disk filled up with copies during the seed study on an H100). A hard link
# is the same file, so a write into a linked shard would reach the entry and every job folder linked to it: linked
# shards are made read-only (which stops every writer but root), quantbench writes only into new, empty folders
# (`discard`), and a shard changed anyway is caught by the manifest's sha256 at the next lookup. Every other
# file (configs, the tokenizer the job writes after a restore) is copied.
LINKED_SUFFIXES = (".safetensors", ".bin")
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


@dataclass
class Entry:
    key: str
    folder: Path  # the saved model folder inside the cache
    manifest: dict
    copied: list[str] = field(default_factory=list)  # shards copied where they could not be linked, with why


def discard(folder: Path) -> Path:
    """`folder`, with whatever was there removed, for a job to write a model into. A file already there may be a
    hard link into the cache, and writers (safetensors, save_pretrained) overwrite files in place: it is unlinked,
    never written through."""
    if folder.exists() or folder.is_symlink():
        shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
    return folder


def lookup(cache_dir: Path, key: str) -> Entry | None:
    """The entry for `key` if it is there and every file still has its recorded sha256; a changed entry is removed."""
    root = Path(cache_dir) / key
    if not (root / MANIFEST).exists():
        return None
    with atomic.file_lock(root):
        if not (root / MANIFEST).exists():  # removed by another job while this one waited
            return None
        manifest = json.loads((root / MANIFEST).read_text())
        changed = measure.changed_files(root / "model", manifest["files"])
        if changed:
            log.warning(
                "Quantized-model cache entry %s changed since it was stored (%s): removed, quantizing again",
                root,
                ", ".join(changed[:5]),
            )
            _remove(root)
            return None
    return Entry(key, root / "model", manifest)


def store(cache_dir: Path, key: str, inputs: dict, model_dir: Path, metrics: dict[str, float], run_id: str) -> Entry:
    """Put a verified model folder into the cache, published whole, with the quantization's own measurements
    (`metrics`: quantize_s, quantize_peak_mem_gb) and the run that made it. Where another job stored the key first,
    theirs is kept. On an error (a full disk) nothing is left behind and the error is raised."""
    cache_dir = Path(cache_dir)
    root = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(root):
        atomic.clean_stale(cache_dir)
        if (root / MANIFEST).exists():
            log.info("The quantized-model cache already holds %s (stored by another job): kept", root)
            return Entry(key, root / "model", json.loads((root / MANIFEST).read_text()))
        tmp = atomic.temporary_path(root)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            copied = _link_tree(model_dir, tmp / "model")
            manifest = {
                "key": key,
                "inputs": inputs,
                "files": measure.file_sha256(tmp / "model"),
                "metrics": metrics,
                "run_id": run_id,
                "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            if root.exists():  # a broken entry (no manifest): replaced
                _remove(root)
            atomic.publish(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("Stored the quantized model in the cache: %s", root)
    return Entry(key, root / "model", manifest, copied)


def restore(entry: Entry, out_dir: Path) -> list[str]:
    """The cached folder as the job's model folder: weight shards hard-linked, the rest copied (the job writes its
    tokenizer there; the entry must not change). Returns the shards that had to be copied instead, with why."""
    with atomic.file_lock(entry.folder.parent):
        if out_dir.exists():
            shutil.rmtree(out_dir)
        return _link_tree(entry.folder, out_dir)


def _remove(root: Path) -> None:
    """Remove an entry: renamed away first, so no reader finds it half-deleted."""
    doomed = atomic.temporary_path(root.with_name(root.name + ".removed"))
    os.rename(root, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> list[str]:
    """Copy the folder `src` to `dst`, weight shards as read-only hard links; the shards that had to be copied."""
    copied: list[str] = []

    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(LINKED_SUFFIXES):
            try:
                os.chmod(s, READ_ONLY)
                os.link(s, d)
                return
            except OSError as err:  # another file system, or one without hard links
                log.warning(
                    "Copying %s instead of hard-linking it (%s): the quantized-model cache and the job folder "
                    "each hold a copy of it",
                    s,
                    err,
                )
                copied.append(f"{Path(s).name}: {err.strerror or err}")
        shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return copied
