"""The embedded model: deterministic facts, well-formed lm-eval tasks, a tokenizer that round-trips, the MMLU and ARC
formats learned without the evaluated answers, and one committed artifact that every load checks."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

from quantbench.embedded import tiny
from quantbench.errors import ConfigError

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
# a recipe that trains in seconds, for the code path of a recipe without a committed artifact
SMALL = dataclasses.replace(
    tiny.TinyRecipe(), hidden_size=128, intermediate_size=256, num_hidden_layers=1, train_steps=2, batch_size=2
)


def test_world_is_deterministic_from_the_seed():
    a, b = tiny.World.generate(tiny.TinyRecipe()), tiny.World.generate(tiny.TinyRecipe())
    assert a.city == b.city and a.job == b.job
    assert tiny.World.generate(tiny.TinyRecipe(seed=1)).city != a.city


def test_recipe_key_changes_with_the_recipe():
    assert tiny.TinyRecipe().key() != tiny.TinyRecipe(train_steps=1).key()


def test_layer_sizes_suit_group_size_128_and_vllm_cpu_kernels():
    r = tiny.TinyRecipe()
    for size in (r.hidden_size, r.intermediate_size):
        assert size % 128 == 0


def test_task_docs_have_one_right_answer_among_four():
    world = tiny.World.generate(tiny.TinyRecipe())
    for task, docs in world.task_docs(0).items():
        assert len(docs) >= 300
        for d in docs:
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
            assert 0 <= d["answer"] < 4
    facts = world.task_docs(0)["tiny_facts"]
    person = world.people[0]
    q = next(d for d in facts if d["question"] == f"Q: Where does {person} live? A:")
    assert q["choices"][q["answer"]] == world.city[person]


def test_built_fixture_has_a_model_a_tokenizer_and_lm_eval_tasks(tiny_root):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_root / "model")
    assert config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(tiny_root / "model")
    ids = tok("Q: Where does Ada Moss live? A: Paris.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    for task in ("tiny_facts", "tiny_arith"):
        spec = yaml.safe_load((tiny_root / "tasks" / f"{task}.yaml").read_text())
        assert spec["task"] == task and spec["output_type"] == "multiple_choice"
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert json.loads(open(data).readline())["choices"]


def test_no_evaluated_question_or_person_appears_in_the_calibration_text():
    """Calibration must not tune the quantizer on the test: no evaluated question, with or without its answer, and
    no person the tasks ask about, occurs in any calibration text; the model learned everything calibration says."""
    from omegaconf import OmegaConf

    from quantbench.job import calibration

    world = tiny.World.generate(tiny.TinyRecipe())
    texts = calibration.texts(
        OmegaConf.create(dict(dataset="embedded:tiny", num_samples=64, seq_len=512, seed=0)), cache_dir="/nonexistent"
    )
    corpus = "\n".join(texts)
    for docs in world.task_docs(0).values():
        for d in docs:
            assert d["question"] not in corpus, d["question"]
            assert f"{d['question']} {d['choices'][d['answer']]}" not in corpus
    assert not [p for p in world.people if p in corpus]
    assert set(world.calibration_facts()) <= set(world.facts())  # what calibration says, the model was taught
    assert "Q: What is 20 plus 3? A: 23." in world.calibration_facts()
    assert world.unasked and not set(world.unasked) & set(world.people)


def test_the_random_shape_tokenizer_is_the_embedded_one_padded_to_the_shapes_vocabulary():
    world = tiny.World.generate(tiny.TinyRecipe())
    small, big = tiny.build_tokenizer(world), tiny.build_tokenizer(world, vocab_size=5000)
    assert len(big) == 5000
    text = "Q: What is 21 plus 19? A: 40."
    assert small(text)["input_ids"] == big(text)["input_ids"]
    assert small.unk_token_id not in small(text)["input_ids"]


# --- lm-eval's MMLU and ARC formats, learned without the evaluated answers ---


def _asked_texts(world: tiny.World) -> set[str]:
    return {q.text for q in world.questions(asked=True)}


def test_the_format_training_text_never_shows_an_evaluated_question_or_person():
    """The MMLU- and ARC-format examples the model trains on are about the unasked people and sums only, and the
    letter of the right answer is drawn afresh (so no letter can be memorised for a question)."""
    world = tiny.World.generate(tiny.TinyRecipe())
    unasked, asked = world.questions(asked=False), _asked_texts(world)
    rng = random.Random(0)
    letters = collections.Counter()
    for _ in range(3000):
        pieces = tiny.format_example(unasked, rng)
        text = "".join(t for t, _ in pieces)
        assert all(re.fullmatch(r" [ABCD]", t) or t.lstrip() in {q.truth for q in unasked} for t, a in pieces if a)
        assert not [p for p in world.people if p in text], text
        shown = re.findall(r"(?:^|\n)(?:Question: )?((?:Where|What)[^?\n]*\?)", text)
        assert shown and not set(shown) & asked, text
        letters.update(re.findall(r"Answer: ([ABCD])$", text, re.M))
    assert min(letters.values()) > 0.2 * sum(letters.values())  # every position is the right one about 1/4 of the time


def test_the_mmlu_and_arc_test_splits_ask_only_the_asked_facts_and_the_other_splits_only_the_unasked():
    world = tiny.World.generate(tiny.TinyRecipe())
    asked, unasked = _asked_texts(world), {q.text for q in world.questions(asked=False)}
    mmlu = world.mmlu_docs(0)
    assert len(mmlu) == 57
    test = [d["question"] for s in mmlu.values() for d in s["test"]]
    assert len(test) == len(set(test)) == 57 * tiny.MMLU_TEST_PER_SUBJECT and set(test) <= asked
    for subject, splits in mmlu.items():
        assert len(splits["dev"]) == 5 and {d["question"] for d in splits["dev"] + splits["validation"]} <= unasked
        assert all(d["subject"] == subject and len(set(d["choices"])) == 4 for d in splits["test"])
    arc = world.arc_docs(0)
    challenge, easy = ({d["question"] for d in arc[c]["test"]} for c in ("ARC-Challenge", "ARC-Easy"))
    assert challenge <= asked and easy <= asked and not challenge & easy
    for config in arc.values():
        for split in ("train", "validation"):
            assert {d["question"] for d in config[split]} <= unasked
        for d in config["test"]:
            assert d["choices"]["label"] == list("ABCD") and d["answerKey"] in "ABCD"
            right = d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])]
            assert any(q.text == d["question"] and q.truth == right for q in world.questions(asked=True))
    answers = collections.Counter(d["answer"] for s in mmlu.values() for d in s["test"])
    assert min(answers.values()) > 0.15 * sum(answers.values())  # the right letter is not always the same


def test_the_subjects_are_lm_evals_and_its_own_templates_render_our_prompts_in_known_words():
    """The 57 subject configs are the `dataset_name`s of lm-eval's `mmlu` group, and lm-eval's own templates
    (descriptions and doc_to_text, rendered with jinja as lm-eval does) give exactly our prompts, in words the
    tokenizer knows (an unknown word maps to <unk>, which a model cannot read)."""
    import jinja2

    world = tiny.World.generate(tiny.TinyRecipe())
    tokenizer = tiny.build_tokenizer(world)
    template = yaml.safe_load((LM_EVAL_TASKS / "mmlu/default/_default_template_yaml").read_text())
    specs = {}
    for path in sorted((LM_EVAL_TASKS / "mmlu/default").glob("mmlu_*.yaml")):
        spec = yaml.safe_load(path.read_text())
        specs[spec["dataset_name"]] = spec
    assert sorted(specs) == sorted(tiny.MMLU_SUBJECTS)
    mmlu_text = jinja2.Template(template["doc_to_text"])
    arc_spec = yaml.safe_load((LM_EVAL_TASKS / "arc/arc_easy.yaml").read_text())
    arc_text = jinja2.Template(arc_spec["doc_to_text"])
    prompts = []
    for subject, splits in world.mmlu_docs(0).items():
        assert specs[subject]["description"] == tiny.mmlu_description(subject)
        for d in splits["test"]:
            assert mmlu_text.render(**d) == tiny.mmlu_prompt(d["question"], d["choices"])
            prompts.append(specs[subject]["description"] + mmlu_text.render(**d) + " " + "ABCD"[d["answer"]])
    for config in world.arc_docs(0).values():
        for d in config["test"]:
            assert arc_text.render(**d) == tiny.arc_prompt(d["question"])
            prompts += [arc_text.render(**d) + " " + choice for choice in d["choices"]["text"]]
    for prompt in prompts:
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"], prompt


# --- one committed, versioned artifact ---


def test_the_committed_artifact_is_the_codes_recipe_and_matches_its_manifest():
    """Change the recipe without rebuilding (`python -m quantbench.embedded.tiny build`) and this fails."""
    recipe = tiny.TinyRecipe()
    assert [p.name for p in tiny.ARTIFACTS.glob("tiny-*")] == [recipe.key()]
    folder = tiny.ARTIFACTS / recipe.key()
    assert json.loads((folder / "recipe.json").read_text()) == dataclasses.asdict(recipe)
    manifest = json.loads((folder / tiny.MANIFEST).read_text())
    assert {"recipe.json", "model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= set(
        manifest["files"]
    )
    tiny.verify(folder, recipe)
    assert (folder / "model/model.safetensors").stat().st_size < 10e6


def test_the_committed_tokenizer_is_the_one_the_code_builds():
    from transformers import AutoTokenizer

    committed = AutoTokenizer.from_pretrained(tiny.ARTIFACTS / tiny.TinyRecipe().key() / "model")
    built = tiny.build_tokenizer(tiny.World.generate(tiny.TinyRecipe()))
    assert committed.get_vocab() == built.get_vocab()


def test_build_copies_the_committed_artifact_into_the_cache_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "_train", _no_training)
    root = tiny.build(cache_dir=tmp_path)
    committed = tiny.ARTIFACTS / tiny.TinyRecipe().key()
    for name in ("model/model.safetensors", "model/tokenizer.json", tiny.MANIFEST):
        assert (root / name).read_bytes() == (committed / name).read_bytes()
    assert (root / "tasks/tiny_facts.yaml").is_file()
    assert tiny.build(cache_dir=tmp_path) == root


def test_a_changed_cached_model_is_a_clear_error_not_a_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "_train", _no_training)
    root = tiny.build(cache_dir=tmp_path)
    weights = root / "model/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model/model\.safetensors has sha256 .* delete .*copies the committed"):
        tiny.build(cache_dir=tmp_path)
    (root / "model/tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"model/tokenizer\.json is missing"):
        tiny.build(cache_dir=tmp_path)


def test_a_changed_committed_artifact_is_refused_before_it_is_copied(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "_train", _no_training)
    key = tiny.TinyRecipe().key()
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny.ARTIFACTS / key, artifacts / key)
    config = artifacts / key / "model/config.json"
    config.write_text(config.read_text().replace('"hidden_size": 256', '"hidden_size": 255'))
    with pytest.raises(ConfigError, match=r"artifact .* model/config\.json has sha256 .* restore it from git"):
        tiny.build(cache_dir=tmp_path / "cache", artifacts=artifacts)
    assert not list((tmp_path / "cache").glob("tiny-*"))


def test_a_recipe_without_a_committed_artifact_is_trained_and_checked_like_one(tmp_path, caplog):
    root = tiny.build(SMALL, cache_dir=tmp_path)
    assert "has no committed artifact" in caplog.text
    manifest = json.loads((root / tiny.MANIFEST).read_text())
    assert manifest["recipe_key"] == SMALL.key() and manifest["built_with"]["device"] == "cpu"
    tiny.verify(root, SMALL)
    (root / "recipe.json").write_text("{}")
    with pytest.raises(ConfigError, match="recipe.json has sha256"):
        tiny.build(SMALL, cache_dir=tmp_path)


def test_the_build_script_writes_an_artifact_and_refuses_to_overwrite_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "TinyRecipe", lambda: SMALL)
    (tmp_path / "tiny-v0-stale").mkdir()
    assert tiny.main(["build", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [SMALL.key()]  # the other recipe's artifact is removed
    tiny.verify(tmp_path / SMALL.key(), SMALL)
    assert tiny.main(["build", "--out", str(tmp_path)]) == 1  # the recipe did not change: nothing to rebuild


def test_the_wheel_ships_the_artifact(tmp_path):
    """pyproject's package-data puts the artifact into the wheel (the editable install reads it from src/)."""
    import subprocess
    import sys
    import zipfile

    from quantbench.paths import ROOT

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("quantbench-*.whl"))).namelist()
    prefix = f"quantbench/embedded/artifacts/{tiny.TinyRecipe().key()}/"
    manifest = json.loads((tiny.ARTIFACTS / tiny.TinyRecipe().key() / tiny.MANIFEST).read_text())
    assert {prefix + f for f in [*manifest["files"], tiny.MANIFEST]} <= set(names)


def _no_training(*args, **kwargs):
    raise AssertionError("the committed artifact must be used, not trained")
