"""The quantized-model cache: a use checks the stored files, a job that finds its key (quantbench.job.identity's quantize
key: test_identity.py) reuses the folder, says so, and still verifies it in a fresh process; nothing a job writes
reaches the entry or another job's folder; jobs storing at once, or on a full disk, leave one whole entry or none."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from helpers.together import run_together
from quantbench.job import identity
from quantbench import measure
from quantbench.job.models import SourceModel
from quantbench.job import quantized_cache as qc


def test_a_hub_id_is_known_by_the_commit_its_revision_resolved_to_not_by_the_revision(tmp_path):
    """models.resolve gives a hub id (transformers downloads at load time) and the commit the hub resolved: "main"
    today and "main" after a push are other models."""
    before = SourceModel(name="m", reference="org/m", path_or_id="org/m", revision="a" * 40, hub_commit="a" * 40)
    after = SourceModel(name="m", reference="org/m", path_or_id="org/m", revision="b" * 40, hub_commit="b" * 40)
    assert identity.model(before, tmp_path) == {"hub": "org/m", "commit": "a" * 40}
    assert identity.model(after, tmp_path) != identity.model(before, tmp_path)


def test_an_entry_whose_files_changed_is_dropped_not_used(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"quantized")
    cache = tmp_path / "cache"
    qc.store(cache, "k1", {"x": 1}, folder, {"quantize_s": 12.0}, "run-1")
    entry = qc.lookup(cache, "k1")
    assert entry.manifest["metrics"] == {"quantize_s": 12.0} and entry.manifest["run_id"] == "run-1"
    (entry.folder / "model.safetensors").write_bytes(b"tampered")
    assert qc.lookup(cache, "k1") is None
    assert not (cache / "k1").exists()


def test_the_cache_holds_no_second_copy_of_the_weights_and_a_jobs_later_writes_do_not_reach_it(tmp_path):
    job = tmp_path / "job" / "model"
    job.mkdir(parents=True)
    (job / "model-00001-of-00001.safetensors").write_bytes(b"quantized weights")
    (job / "config.json").write_text('{"quantization_config": {}}')
    cache = tmp_path / "cache"
    entry = qc.store(cache, "k1", {"x": 1}, job, {"quantize_s": 1.0}, "run-1")
    shard = "model-00001-of-00001.safetensors"
    assert (entry.folder / shard).samefile(job / shard)  # one copy of the weights on disk
    assert not (entry.folder / "config.json").samefile(job / "config.json")
    (job / "config.json").write_text("{}")  # e.g. the job rewrites a small file after storing
    again = tmp_path / "job2" / "model"
    qc.restore(qc.lookup(cache, "k1"), again)
    assert (again / shard).samefile(entry.folder / shard)
    (again / "tokenizer.json").write_text("{}")  # the job writes its tokenizer beside a restored model
    (again / "config.json").write_text('{"edited": true}')
    assert qc.lookup(cache, "k1") is not None  # still the entry it stored: no change reached it
    assert json.loads((entry.folder / "config.json").read_text()) == {"quantization_config": {}}


def shard_folder(folder, seed: int = 0, mb: int = 4):
    """A model folder with a real safetensors shard of `mb` MB (as quantizers save them) and a config."""
    folder.mkdir(parents=True)
    weights = torch.randn(mb * 2**18, generator=torch.Generator().manual_seed(seed))
    save_file({"model.layers.0.mlp.up_proj.weight": weights}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    return folder


def test_linked_shards_are_read_only_and_a_job_writes_only_after_unlinking(tmp_path):
    """A hard link is the same file: a writer that truncates it in place (safetensors, save_pretrained) writes into
    the entry and every folder linked to it. The shared shards are read-only (root ignores that, other accounts
    do not), and a job clears its model folder before writing (`discard`), so its save makes a new file."""
    job = shard_folder(tmp_path / "job" / "model")
    entry = qc.store(tmp_path / "cache", "k1", {"x": 1}, job, {}, "run-1")
    restored = tmp_path / "job2" / "model"
    qc.restore(entry, restored)
    shard = "model.safetensors"
    assert (restored / shard).samefile(entry.folder / shard) and (job / shard).samefile(entry.folder / shard)
    assert stat.S_IMODE((entry.folder / shard).stat().st_mode) == 0o444
    recorded = measure.file_sha256(entry.folder)
    # a rerun into the same folder: the new model is saved where the restored one was
    shard_folder(qc.discard(restored), seed=7)
    assert not (restored / shard).samefile(entry.folder / shard)
    assert measure.file_sha256(entry.folder) == recorded and measure.file_sha256(job) == recorded
    assert qc.lookup(tmp_path / "cache", "k1") is not None


def test_a_shard_copied_instead_of_linked_is_said_at_warning(tmp_path, caplog):
    """Across file systems a hard link is impossible: the shard is copied (the disk then holds it twice), with a
    WARNING and the shard named on the entry, which the job tags on its run (`cache_link`)."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    cache = Path(tempfile.mkdtemp(dir=other, prefix="quantbench-test-"))
    try:
        with caplog.at_level(logging.WARNING, logger="quantbench.job.quantized_cache"):
            entry = qc.store(cache, "k1", {"x": 1}, shard_folder(tmp_path / "job"), {}, "run-1")
        assert [c.split(":")[0] for c in entry.copied] == ["model.safetensors"]
        assert "Copying" in caplog.text and "instead of hard-linking" in caplog.text
        assert not (entry.folder / "model.safetensors").samefile(tmp_path / "job" / "model.safetensors")
        assert [c.split(":")[0] for c in qc.restore(entry, tmp_path / "job2")] == ["model.safetensors"]
    finally:
        shutil.rmtree(cache)


STORE = """
from pathlib import Path
from quantbench.job import quantized_cache as qc
"""


def test_jobs_storing_the_same_key_at_once_leave_one_whole_entry(tmp_path):
    """Two processes store the same key at the same moment (two jobs of one quantization): both succeed, the entry
    is one of theirs, whole, and no temporary folder is left."""
    cache = tmp_path / "cache"
    folders = [shard_folder(tmp_path / f"job{i}", seed=i) for i in range(2)]
    body = (
        "entry = qc.store(Path(sys.argv[1]), 'k1', {}, Path(sys.argv[2]), {}, sys.argv[3]); "
        "print('stored', entry.manifest['run_id'])"
    )
    done = run_together([(STORE, body, [str(cache), str(f), f"run-{i}"]) for i, f in enumerate(folders)])
    for result in done:
        assert result.returncode == 0, result.stdout[-3000:]
    entry = qc.lookup(cache, "k1")
    kept = int(entry.manifest["run_id"].removeprefix("run-"))
    assert measure.file_sha256(entry.folder) == measure.file_sha256(folders[kept])
    assert sorted(p.name for p in cache.iterdir()) == ["k1", "k1.lock"]


def test_a_killed_stores_temporary_folder_is_removed_once_its_process_is_gone(tmp_path):
    from quantbench import atomic

    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = cache / f".k0.tmp-{atomic.HOST}-{dead.pid}"
    alive = cache / f".k9.tmp-{atomic.HOST}-{os.getpid()}"
    elsewhere = cache / f".k8.tmp-another-host-{dead.pid}"
    for folder in (gone, alive, elsewhere):
        (folder / "model").mkdir(parents=True)
    qc.store(cache, "k1", {}, shard_folder(tmp_path / "job"), {}, "run-1")
    assert not gone.exists() and alive.exists() and elsewhere.exists()


def test_a_store_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    """A store interrupted by an error (here: the manifest cannot be written, as on a full disk) raises, and the
    cache holds neither an entry nor a temporary folder."""
    cache = tmp_path / "cache"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qc.measure, "file_sha256", full)
    with pytest.raises(OSError, match="No space left"):
        qc.store(cache, "k1", {}, shard_folder(tmp_path / "job"), {}, "run-1")
    assert [p.name for p in cache.iterdir()] == ["k1.lock"]


@pytest.mark.e2e
def test_a_second_job_with_the_same_key_reuses_the_quantized_folder_and_still_verifies_it(tiny_root, tmp_path):
    quick = ("method=rtn", "eval=none", "bench=none", "quality=none")
    first = run_cli(*quick, mlruns=tmp_path / "mlruns", workdir=tmp_path)
    again = run_cli(*quick, "force=true", mlruns=tmp_path / "mlruns", workdir=tmp_path)
    miss, hit = again.runs()  # in start order (a changed setting changes the key: the unit tests above)
    assert (miss.data.tags["cache"], hit.data.tags["cache"]) == ("miss", "hit")
    assert hit.data.tags["cache_key"] == miss.data.tags["cache_key"]
    assert "Reusing the quantized model from the cache" in again.result.stdout
    assert "Reusing" not in first.result.stdout
    # the quantization's own cost, as measured when it ran, and what the reuse took
    assert hit.data.metrics["quantize_s"] == miss.data.metrics["quantize_s"]
    assert hit.data.metrics["cache_restore_s"] > 0
    assert hit.data.tags["artifact_verified"] == "true"
    # the same files reloaded the same way give the same loss; the in-memory models (the quantizer's output, the
    # cached folder loaded) may round differently on another CPU's kernels, within the artifact check's tolerance
    reload = "fingerprint_reload_nll"
    assert hit.data.metrics[reload] == pytest.approx(miss.data.metrics[reload], rel=1e-6)
    assert hit.data.metrics["fingerprint_nll"] == pytest.approx(miss.data.metrics["fingerprint_nll"], rel=1e-3)
    entry = tmp_path / "quantized" / miss.data.tags["cache_key"] / "manifest.json"
    assert json.loads(entry.read_text())["run_id"] == miss.info.run_id

    # a cached file that changed is caught, the entry dropped, the model quantized again and stored anew
    weights = next((entry.parent / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    healed = run_cli(*quick, "force=true", mlruns=tmp_path / "mlruns", workdir=tmp_path)
    requantized = healed.runs()[-1]
    assert requantized.data.tags["cache"] == "miss" and requantized.info.status == "FINISHED"
    assert "changed since it was stored" in healed.result.stdout and "Quantizing" in healed.result.stdout
    assert json.loads(entry.read_text())["run_id"] == requantized.info.run_id


@pytest.mark.e2e
def test_a_rerun_into_a_used_job_folder_never_writes_into_the_cache_or_another_jobs_model(tiny_root, tmp_path):
    """A GPTQ artifact stored from job folder A and restored into job folder B shares its shard with both. Then a
    job reruns into B's fixed folder (hydra.run.dir), with the cache off and another calibration seed: it saves a
    new model, and the cache entry, A's model and B's model keep every byte (sha256s unchanged)."""
    quick = ("method=gptq", "eval=none", "bench=none", "quality=none")
    mlruns, cache = tmp_path / "mlruns", f"quantized_cache.dir={tmp_path}/quantized"
    run_cli(*quick, f"hydra.run.dir={tmp_path}/a", cache, mlruns=mlruns, workdir=tmp_path)
    restored = run_cli(*quick, "force=true", f"hydra.run.dir={tmp_path}/b", cache, mlruns=mlruns, workdir=tmp_path)
    first, second = restored.runs()
    assert (first.data.tags["cache"], second.data.tags["cache"]) == ("miss", "hit")
    entry = qc.lookup(tmp_path / "quantized", first.data.tags["cache_key"])
    folders = [entry.folder, *(tmp_path / "a").glob("model*"), *(tmp_path / "b").glob("model*")]
    assert len(folders) == 3
    shards = [next(f.glob("*.safetensors")) for f in folders]
    assert shards[0].stat().st_size > 100_000 and all(s.samefile(shards[0]) for s in shards)  # one linked shard
    before = {f: measure.file_sha256(f) for f in folders}

    rerun = run_cli(*quick, "force=true", f"hydra.run.dir={tmp_path}/b", "quantized_cache.enabled=false",
                    "calibration.seed=7", cache, mlruns=mlruns, workdir=tmp_path)  # fmt: skip
    assert "Quantizing" in rerun.result.stdout and rerun.runs()[-1].info.status == "FINISHED"
    assert {f: measure.file_sha256(f) for f in folders} == before
    assert qc.lookup(tmp_path / "quantized", first.data.tags["cache_key"]) is not None
    (new,) = set((tmp_path / "b").glob("model*")) - set(folders)
    new_shard = next(new.glob("*.safetensors"))
    assert measure.sha256(new_shard) != measure.sha256(shards[0])  # seed 7 made another model, saved on its own
