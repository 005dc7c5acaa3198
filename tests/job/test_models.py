"""Resolving a model reference (quantbench.job.models): the embedded model, a local folder or a hub id, each to what
from_pretrained gets; a folder that is not a model is refused before any weights load; the resolved model loads in
the dtype asked for. (A missing folder, a truncated shard and a hub id while offline: job/test_bad_input.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from quantbench.errors import ConfigError
from quantbench.job import models
from quantbench.job.models import SourceModel


def model_cfg(pretrained: str, **extra):
    return OmegaConf.create({"name": "m", "pretrained": pretrained, **extra})


def test_the_embedded_model_resolves_to_its_built_folder_without_hub_tags(tiny_root):
    source = models.resolve(model_cfg("embedded:tiny"), tiny_root.parents[1])
    assert source.path_or_id == str(tiny_root / "model") and source.reference == "embedded:tiny"
    assert source.hub_commit is None and source.tags() == {}
    assert source.local_folder() == source.path_or_id


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_embedded_model_loads_on_the_cpu_in_the_dtype_asked_for(tiny_root, dtype):
    source = models.resolve(model_cfg("embedded:tiny"), tiny_root.parents[1])
    model = source.load(dtype, "cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config.vocab_size == source.config().vocab_size >= len(source.tokenizer())


def test_a_local_folder_resolves_to_its_absolute_path_with_its_revision_and_trust(tiny_root, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_root / "model", tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    source = models.resolve(model_cfg("./my-model", revision="v1", trust_remote_code=True), tmp_path / "cache")
    assert source.path_or_id == str(folder.resolve()) and source.reference == "./my-model"
    assert source.revision == "v1" and source.trust_remote_code is True
    assert source.hub_commit is None and source.tags() == {}


def test_a_folder_without_config_json_is_refused_as_not_a_model_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ConfigError, match="has no config.json, so it is not a Hugging Face model folder"):
        models.resolve(model_cfg(str(tmp_path / "weights")), tmp_path)


@pytest.mark.parametrize(
    ("ref", "is_path"),
    [("/abs/model", True), ("./model", True), ("../model", True), ("~/model", True), ("a/b/c", True),
     ("org/model", False), ("gpt2", False)],
)  # fmt: skip
def test_a_path_is_told_from_a_hub_id_by_its_shape(ref, is_path):
    assert models._looks_like_path(ref) is is_path


def test_a_hub_model_is_tagged_with_its_id_resolved_commit_and_endpoint():
    source = SourceModel(name="m", reference="org/m", path_or_id="org/m", revision="c" * 40, hub_commit="c" * 40)
    assert source.tags() == {
        "model.hub_id": "org/m",
        "model.hub_commit": "c" * 40,
        "model.hub_endpoint": models.hub_endpoint(),
    }
