"""State that several jobs share on disk: published whole or not at all, built by one process at a time.

Jobs run side by side (a multirun on several GPUs, two users, a CI matrix) and can be killed at any point, so what
they share (the quantized-model cache, the built shape models, vLLM's capability file) is written under a temporary
name and renamed into place (a reader sees nothing or everything), built under an exclusive lock (two jobs do not
build the same 16 GB model at once), and a killed build's temporary folder is removed by a later builder once the
process that owned it is gone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import platform
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

HOST = platform.node()
# .<target name>.tmp-<host>-<pid>: the host and process that own a temporary file or folder
_TMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


@contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock` (beside `target`) for the block; wait, saying so, while another
    process holds it. The lock file stays (deleting it would let a third process lock a file nobody else sees)."""
    lock = Path(target).with_name(Path(target).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that holds %s", lock)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def temporary_path(target: Path) -> Path:
    """Where this process builds `target` before publishing it: beside it (same file system, so the rename is
    atomic), named for this host and process so that a later builder can tell when its owner is gone."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{HOST}-{os.getpid()}")


def publish(tmp: Path, target: Path) -> bool:
    """Rename the finished folder `tmp` to `target`. False, and `tmp` removed, where another process published
    `target` first (theirs is kept: a reader may already be using it)."""
    try:
        os.rename(tmp, target)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and Path(target).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def build_once(target: Path, build: Callable[[Path], None]) -> bool:
    """Build the folder `target` once across processes: under its lock, unless it is done (a `DONE` file inside),
    `build` fills a fresh temporary folder, which is then marked done and published; a failed build leaves nothing.
    True where this process built it, False where another had."""
    target = Path(target)
    with file_lock(target):
        if (target / "DONE").exists():
            return False
        clean_stale(target.parent)
        tmp = temporary_path(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if target.exists():  # a folder without DONE: not a finished build
                shutil.rmtree(target)
            publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def write_text(path: Path, text: str) -> None:
    """Write a file whole: to a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` that a process of this host left behind and that is gone
    (killed mid-build). Those of live processes, and of other hosts (which cannot be checked from here), stay."""
    import psutil

    removed = []
    for path in Path(folder).glob(".*.tmp-*") if Path(folder).is_dir() else []:
        match = _TMP.match(path.name)
        if match is None or match["host"] != HOST or psutil.pid_exists(int(match["pid"])):
            continue
        log.warning(
            "Removing %s, left by process %s of this host, which is gone (killed mid-build)", path, match["pid"]
        )
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
