"""Shared state on disk (quantbench.atomic): whole or nothing, one writer at a time, a killed writer's leftovers
removed once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quantbench import atomic


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "caps.json"
    atomic.write_text(path, "old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(TypeError):
        atomic.write_text(path, 12)  # a write that fails half-way (here: not text) never reaches the file
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.json"]


def test_publishing_where_another_process_published_first_keeps_theirs(tmp_path):
    target = tmp_path / "entry"
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "file").write_text(text)
    assert atomic.publish(first, target) is True
    assert atomic.publish(second, target) is False
    assert (target / "file").read_text() == "first" and not second.exists()


def test_leftovers_of_gone_processes_of_this_host_are_removed_and_no_other(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone_dir = tmp_path / f".x.tmp-{atomic.HOST}-{dead.pid}"
    gone_file = tmp_path / f".y.json.tmp-{atomic.HOST}-{dead.pid}"
    alive = tmp_path / f".x.tmp-{atomic.HOST}-{os.getpid()}"
    other_host = tmp_path / f".x.tmp-elsewhere-{dead.pid}"
    unrelated = tmp_path / ".x.tmp"
    for folder in (gone_dir, alive, other_host, unrelated):
        folder.mkdir()
    gone_file.write_text("{")
    assert sorted(atomic.clean_stale(tmp_path)) == sorted([gone_dir, gone_file])
    assert alive.exists() and other_host.exists() and unrelated.exists()
