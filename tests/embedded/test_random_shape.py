"""`model=llama-3.1-8b-shape`: a real architecture with seeded random weights, built offline and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from quantbench.job import models
from quantbench.errors import ConfigError
from quantbench.embedded import random_shape

SMALL = dict(
    random_shape.SHAPES["llama-3.1-8b"],
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
)


def test_the_8b_shape_is_llama_3_1_8b_exactly():
    shape = random_shape.SHAPES["llama-3.1-8b"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (4096, 14336, 32)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]) == (32, 8, 128256)
    assert shape["tie_word_embeddings"] is False


def test_a_shape_builds_once_with_its_config_and_a_tokenizer_of_its_vocabulary(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    root = random_shape.build("llama-3.1-8b-shape", tmp_path, fields=SMALL, device="cpu")
    config = AutoConfig.from_pretrained(root / "model")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 2, 1024)
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert len(tokenizer) == 1024
    # the embedded model's language tokenizes into known words, so calibration=local works on it
    ids = tokenizer("Q: What is 3 plus 4? A: 7.", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert json.loads((root / "shape.json").read_text())["fields"] == SMALL
    mtime = (root / "DONE").stat().st_mtime
    assert random_shape.build("llama-3.1-8b-shape", tmp_path, fields=SMALL, device="cpu") == root
    assert (root / "DONE").stat().st_mtime == mtime  # cached, not rebuilt


def test_the_same_seed_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = random_shape.build("llama-3.1-8b-shape", tmp_path / "a", fields=SMALL, device="cpu")
    b = random_shape.build("llama-3.1-8b-shape", tmp_path / "b", fields=SMALL, device="cpu")
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert wa["model.layers.0.mlp.up_proj.weight"].float().std() > 0.01  # random, not zeros


def test_the_shape_model_resolves_and_is_flagged_as_random_weights():
    assert models.has_random_weights("embedded:llama-3.1-8b-shape")
    assert not models.has_random_weights("embedded:tiny")
    assert not models.has_random_weights("meta-llama/Llama-3.1-8B")
    cfg = OmegaConf.load("conf/model/llama-3.1-8b-shape.yaml")
    assert cfg.pretrained == "embedded:llama-3.1-8b-shape"


def test_an_unknown_embedded_model_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="embedded:llama-3.1-8b-shape"):
        models.resolve(OmegaConf.create({"name": "x", "pretrained": "embedded:gpt-5-shape"}), tmp_path)


BUILD = """
import json, logging
from pathlib import Path
from quantbench.embedded import random_shape
logging.basicConfig(level=logging.INFO, format="%(message)s")
"""


def test_two_jobs_that_need_the_same_shape_at_once_build_it_once(tmp_path):
    """The 8B shape is 16 GB: two jobs starting together must not both build it. One builds (under a lock), the
    other waits and takes its folder; no temporary folder is left."""
    from helpers.together import run_together

    body = "print('ROOT', random_shape.build('llama-3.1-8b-shape', Path(sys.argv[1]), fields=json.loads(sys.argv[2]), device='cpu'))"
    done = run_together([(BUILD, body, [str(tmp_path), json.dumps(SMALL)])] * 2)
    for result in done:
        assert result.returncode == 0, result.stdout[-3000:]
    assert sum(r.stdout.count("Building llama-3.1-8b-shape") for r in done) == 1, [r.stdout for r in done]
    roots = {line.split(" ", 1)[1] for r in done for line in r.stdout.splitlines() if line.startswith("ROOT ")}
    assert len(roots) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [Path(roots.pop()).name]


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build(tmp_path):
    """A build killed mid-way leaves its temporary folder; the next build removes it once its process is gone (a
    live builder's folder, or another host's, is left alone)."""
    import subprocess
    import sys

    from quantbench import atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = random_shape.build("llama-3.1-8b-shape", tmp_path / "probe", fields=SMALL, device="cpu").name
    gone = tmp_path / f".{name}.tmp-{atomic.HOST}-{dead.pid}"
    other_host = tmp_path / f".{name}.tmp-another-host-{dead.pid}"
    for folder in (gone, other_host):
        (folder / "model").mkdir(parents=True)
    random_shape.build("llama-3.1-8b-shape", tmp_path, fields=SMALL, device="cpu")
    assert not gone.exists() and other_host.exists()
