"""Save once, verify every artifact: a saved folder that does not behave like the evaluated model fails the run."""

from __future__ import annotations

import pytest
import torch

from quantbench.job import fingerprint


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("artifact")
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.float32)
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tiny_root / "model")
    ids = fingerprint.input_ids(tok, "Q: Where does Ada Moss live? A: Paris. Q: What is 3 plus 4? A: 7.")
    return model, folder, ids


def test_a_faithful_artifact_passes(saved):
    model, folder, ids = saved
    result = fingerprint.verify(model, folder, ids, "cpu")
    assert result["fingerprint_agreement"] == 1.0
    assert result["fingerprint_nll"] == pytest.approx(result["fingerprint_reload_nll"], rel=1e-4)


def test_an_artifact_that_differs_from_the_evaluated_model_is_refused(saved):
    model, folder, ids = saved
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-1.0)  # the in-memory model no longer matches what is on disk
    try:
        with pytest.raises(RuntimeError, match="not what was scored"):
            fingerprint.verify(model, folder, ids, "cpu")
    finally:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(-1.0)


def test_an_artifact_that_does_not_load_is_refused(tmp_path, saved):
    model, _, ids = saved
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="does not reload"):
        fingerprint.verify(model, tmp_path, ids, "cpu")


def test_a_model_whose_loss_is_nan_in_both_copies_is_refused(tmp_path, saved):
    """NaN compares false with every tolerance, so two NaN fingerprints would 'agree': the check must refuse them."""
    from transformers import AutoModelForCausalLM

    model, folder, ids = saved
    broken = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="non-finite"):
        fingerprint.verify(broken, tmp_path, ids, "cpu")
