"""The quantized-model cache: what makes an artifact is its key, a use checks the stored files, and a job that finds
its key reuses the folder, says so, and still verifies it in a fresh process."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from quantbench import quantized_cache as qc
from quantbench.methods.rtn import RTN
from quantbench.models import SourceModel


def job_cfg(tmp_path, **changes):
    cfg = {
        "paths": {"cache": str(tmp_path / "cache")},
        "method": {"_target_": "quantbench.methods.rtn.RTN", "name": "rtn", "bits": 4, "group_size": 128},
        "calibration": {"dataset": "embedded:tiny", "num_samples": 64, "seq_len": 128, "seed": 0},
        "hardware": {"dtype": "bfloat16", "device": "cpu"},
    }
    return OmegaConf.merge(cfg, changes)


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "src_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights v1")
    return SourceModel(name="m", reference=str(folder), path_or_id=str(folder))


def test_the_key_follows_what_makes_the_artifact_and_not_where_it_is_written(tmp_path, source):
    method = RTN("rtn", bits=4, group_size=128)
    key = qc.key_of(qc.inputs(job_cfg(tmp_path), method, source))
    assert key == qc.key_of(qc.inputs(job_cfg(tmp_path), method, source))
    assert key != qc.key_of(qc.inputs(job_cfg(tmp_path, method={"group_size": 64}), method, source))
    assert key != qc.key_of(qc.inputs(job_cfg(tmp_path, hardware={"device": "cuda:0"}), method, source))
    uncalibrated = qc.inputs(job_cfg(tmp_path, calibration={"seed": 1}), method, source)
    assert "calibration" not in uncalibrated and qc.key_of(uncalibrated) == key  # RTN reads no calibration text
    (tmp_path / "src_model" / "model.safetensors").write_bytes(b"weights v2")  # new source weights, new key
    assert qc.key_of(qc.inputs(job_cfg(tmp_path), method, source)) != key


def test_calibrated_methods_key_on_the_calibration_too(tmp_path, source):
    class Calibrated(RTN):
        needs_calibration = True

    method = Calibrated("rtn", bits=4, group_size=128)
    a = qc.key_of(qc.inputs(job_cfg(tmp_path), method, source))
    assert a != qc.key_of(qc.inputs(job_cfg(tmp_path, calibration={"seed": 1}), method, source))


def test_a_hub_snapshot_is_known_by_its_commit_without_hashing(tmp_path):
    snap = tmp_path / "models--org--m" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    source = SourceModel(name="m", reference="org/m", path_or_id=str(snap))
    assert qc.source_identity(source, tmp_path) == {"hub": "org/m", "commit": "0123abcd"}


def test_a_hub_id_is_known_by_the_commit_its_revision_resolved_to_not_by_the_revision(tmp_path):
    """models.resolve gives a hub id (transformers downloads at load time) and the commit the hub resolved: "main"
    today and "main" after a push are other models."""
    before = SourceModel(name="m", reference="org/m", path_or_id="org/m", revision="a" * 40, hub_commit="a" * 40)
    after = SourceModel(name="m", reference="org/m", path_or_id="org/m", revision="b" * 40, hub_commit="b" * 40)
    assert qc.source_identity(before, tmp_path) == {"hub": "org/m", "commit": "a" * 40}
    assert qc.source_identity(after, tmp_path) != qc.source_identity(before, tmp_path)


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
    assert hit.data.metrics["fingerprint_nll"] == pytest.approx(miss.data.metrics["fingerprint_nll"], rel=1e-6)
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
