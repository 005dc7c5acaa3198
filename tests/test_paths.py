"""Folder names a sweep's jobs get (conf/hydra/default.yaml)."""

from __future__ import annotations

from quantbench.paths import DIRNAME_LIMIT, content_view, job_dirname


def test_a_short_override_list_names_the_folder_as_hydra_writes_it():
    assert job_dirname("method=gptq,repeats=3") == "method=gptq,repeats=3"


def test_a_long_override_list_is_cut_to_a_valid_file_name_that_still_tells_jobs_apart():
    """The seed study with its CPU sizes: Hydra's own name is 270 characters, over the 255 a file name may have."""
    common = ",".join(f"bench.knob_{i}={i}" for i in range(20))
    a, b = job_dirname(f"{common},method=awq"), job_dirname(f"{common},method=gptq")
    assert len(a) <= DIRNAME_LIMIT and len(b) <= DIRNAME_LIMIT and a != b
    assert a.startswith("bench.knob_0=0,")


def test_a_path_given_as_a_value_does_not_make_nested_folders():
    assert "/" not in job_dirname("eval.include_path=/data/tasks")


def test_the_hydra_config_excludes_the_one_list_of_location_keys_from_job_folder_names():
    """Hydra reads override_dirname.exclude_keys from YAML; quantbench.paths.LOCATION_KEYS is the list it must be."""
    from omegaconf import OmegaConf

    from quantbench.job import identity
    from quantbench.paths import LOCATION_GROUPS, LOCATION_KEYS, LOCATION_PREFIXES, ROOT

    hydra = OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml")
    assert list(hydra.job.config.override_dirname.exclude_keys) == list(LOCATION_KEYS)
    assert set(LOCATION_GROUPS) <= set(identity.NOT_IN_CONFIG_HASH)  # where things go is not in the job key
    assert all(key.startswith(LOCATION_PREFIXES) for key in LOCATION_KEYS)  # nor in run labels or the sweep summary


def test_every_copy_of_one_artifact_is_served_from_one_path_that_reads_the_latest_copy(tmp_path):
    first, second = tmp_path / "job-a" / "model", tmp_path / "job-b" / "model"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(folder.parent.name)
    view = content_view(first, "abc123", tmp_path / "cache")
    assert content_view(second, "abc123", tmp_path / "cache") == view  # the same path: vLLM's compile cache key
    assert (view / "config.json").read_text() == "job-b" and view.resolve() == second.resolve()
    assert content_view(first, "def456", tmp_path / "cache") != view
    assert sorted(p.name for p in view.parent.iterdir()) == ["abc123", "def456"]  # no staged links left behind
